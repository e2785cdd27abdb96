"""``results.json``: every entry point's record of its runs, written atomically.

Here, at the bottom of the layers, so that the in-process runs (:mod:`flower_split.runs.local`),
``flower-split simulate`` and the deployed ServerApp (run-config ``results-dir``) all write the
file the same way: ``{"runs": [...]}``, through a temp file in the same directory and
``os.replace``, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RESULTS_FILE = "results.json"


def write_results(out_dir: str | Path, runs: list[dict]) -> Path:
    """Write ``{"runs": [...]}`` to ``out_dir/results.json`` atomically (temp file + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / RESULTS_FILE
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".results-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"runs": runs}, handle, indent=2)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
