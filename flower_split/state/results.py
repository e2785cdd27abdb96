"""``results.json``: every entry point's record of its runs, written atomically.

Here, at the bottom of the layers, so that the in-process runs (:mod:`flower_split.runs.local`),
``flower-split simulate`` and the deployed ServerApp (run-config ``results-dir``) all write the
file the same way: ``{"runs": [...]}``, through :func:`flower_split.state.store.write_atomic`
(a temp file in the same directory, ``fsync``, ``os.replace``), so a reader never sees half a
file.
"""

from __future__ import annotations

import json
from pathlib import Path

from flower_split.state.store import write_atomic

RESULTS_FILE = "results.json"


def write_results(out_dir: str | Path, runs: list[dict]) -> Path:
    """Write ``{"runs": [...]}`` to ``out_dir/results.json`` atomically (0600, as before)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / RESULTS_FILE
    write_atomic(target, json.dumps({"runs": runs}, indent=2).encode())
    return target
