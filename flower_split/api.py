"""Python API: run one training job described by a :class:`RunConfig` and write results.json."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from flower_split.config import ConfigError, RunConfig
from flower_split.data import TokenizedDataset, load_dataset
from flower_split.data.tenants import sample_rows
from flower_split.model import load_tokenizer

if TYPE_CHECKING:
    from flower_split.audit import CloudViewRecorder

RESULTS_FILE = "results.json"


def train(config: RunConfig, progress: bool = True, recorder: CloudViewRecorder | None = None) -> dict:
    """Run ``config`` in process and return one ``results.json`` run entry.

    ``recorder`` (split mode only) records the cloud's view for the leakage audit.
    """
    from flower_split.train import train_centralized, train_split

    config.validate()
    if recorder is not None and config.mode != "split":
        raise ConfigError("audit: only split runs have a cloud whose view can be recorded")
    train_data, test_data = load_dataset(config.dataset, config.data_dir)
    train_data = train_data.subset(sample_rows(len(train_data), config.max_train_samples, config.seed))
    test_data = test_data.subset(sample_rows(len(test_data), config.max_test_samples, config.seed + 1))
    tokenizer = load_tokenizer(config.model)
    train_tok = TokenizedDataset(train_data, tokenizer, config.max_length)
    test_tok = TokenizedDataset(test_data, tokenizer, config.max_length)
    if config.mode == "centralized":
        metrics = train_centralized(config, train_tok, test_tok, train_data.num_classes, progress=progress)
    else:
        metrics = train_split(config, train_tok, test_tok, train_data.num_classes, progress, recorder)
    security = "none" if config.mode == "centralized" else config.security
    return {
        "name": f"{config.mode}-{security}" if config.mode == "split" else "centralized-lora",
        "mode": config.mode,
        "security": security,
        "dataset": config.dataset,
        "model": config.model,
        **metrics,
        "config": config.to_dict(),
    }


def write_results(out_dir: str | Path, runs: list[dict]) -> Path:
    """Write ``{"runs": [...]}`` to ``out_dir/results.json`` atomically (temp file + rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / RESULTS_FILE
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump({"runs": runs}, handle, indent=2)
    os.replace(tmp, target)
    return target

