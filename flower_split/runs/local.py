"""In-process runs: one training job described by a :class:`RunConfig`, and results.json
(:func:`write_results`, from :mod:`flower_split.state.results`).

Centralized LoRA runs on pooled data; split runs ask the security backend of
``config.security`` (:mod:`flower_split.backends`) to wire and train its parties.
"""

from __future__ import annotations

from pathlib import Path

from flower_split.backends import backend_for
from flower_split.backends.saved import SaveTo
from flower_split.audit import CloudViewRecorder
from flower_split.config import ConfigError, RunConfig
from flower_split.data import TokenizedDataset, load_dataset
from flower_split.data.tenants import sample_rows
from flower_split.model import load_tokenizer
from flower_split.state.results import RESULTS_FILE, write_results
from flower_split.train import train_centralized


def train(config: RunConfig, progress: bool = True, recorder: CloudViewRecorder | None = None,
          state_dir: str | Path | None = None) -> dict:
    """Run ``config`` in process and return one ``results.json`` run entry.

    ``recorder`` (split mode only) records the cloud's view for the leakage audit;
    ``state_dir`` (split mode only) receives every party's state at the end (docs/STATE.md),
    which ``flower-split predict`` / :class:`flower_split.runs.predict.SplitClassifier` load.
    """
    config.validate()
    backend = backend_for(config) if config.mode == "split" else None
    if recorder is not None and backend is None:
        raise ConfigError("audit: only split runs have a cloud whose view can be recorded")
    if state_dir is not None and backend is None:
        raise ConfigError("state: only split runs have party states to save")
    train_data, test_data = load_dataset(config.dataset, config.data_dir)
    train_data = train_data.subset(sample_rows(len(train_data), config.max_train_samples, config.seed))
    test_data = test_data.subset(sample_rows(len(test_data), config.max_test_samples, config.seed + 1))
    tokenizer = load_tokenizer(config.model)
    train_tok = TokenizedDataset(train_data, tokenizer, config.max_length)
    test_tok = TokenizedDataset(test_data, tokenizer, config.max_length)
    if backend is None:
        metrics = train_centralized(config, train_tok, test_tok, train_data.num_classes, progress=progress)
    else:
        save = None if state_dir is None else SaveTo(Path(state_dir), list(train_data.label_names))
        metrics = backend.train_in_process(config, train_tok, test_tok, train_data.num_classes, progress, recorder,
                                           save)
    return {
        "name": "centralized-lora" if backend is None else f"split-{backend.name}",
        "mode": config.mode,
        "security": "none" if backend is None else backend.name,
        "dataset": config.dataset,
        "model": config.model,
        **metrics,
        "config": config.to_dict(),
    }


__all__ = ["RESULTS_FILE", "train", "write_results"]
