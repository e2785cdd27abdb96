"""Inference over Flower on a tenant's own texts: the deployed cloud serves the body, the
tenant keeps its texts and its predictions.

A run with run config ``predict = true`` (and the ``session`` and ``state-dir`` of a trained
run: :mod:`flower_split.flower.cloud_state`) trains nothing: the ServerApp resumes the cloud
and runs one evaluation of scope ``predict``, the split inference protocol on every tenant's
node config ``predict-input`` (a UTF-8 file, one text per line; blank lines skipped), all
tenants' batches in the same round trips (plain: one body pass per stage for all of them).
Each tenant writes ``predict-output`` (default ``<predict-input>.preds.jsonl``) on its own
disk, one JSON line per text: ``{"text", "label", "probabilities"}`` (every label, by
probability), and reports only how many texts it classified: the cloud sees what it sees in
any inference (f; in secure mode only shares), never a text, a label or a probability.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from flwr.app import Context

from flwr.app import ConfigRecord

from flower_split.config import RunConfig
from flower_split.data import TextDataset, TokenizedDataset
from flower_split.flower.node_data import run_labels
from flower_split.flower.settings import FlowerSettings
from flower_split.model import load_tokenizer
from flower_split.protocol import ProtocolError

PREDICT_SCOPE = "predict"
INPUT_CONFIG, OUTPUT_CONFIG = "predict-input", "predict-output"
EVAL_STATE = "eval"  # ConfigRecord {scope}: the scope of the evaluation in progress


def note_scope(context: Context, scope: str) -> None:
    """Remember the scope of the evaluation in progress (its later messages carry none)."""
    context.state[EVAL_STATE] = ConfigRecord({"scope": scope})


def predicting(context: Context) -> bool:
    """Whether the evaluation in progress classifies the node's own texts."""
    record = context.state.get(EVAL_STATE)
    return isinstance(record, ConfigRecord) and record.get("scope") == PREDICT_SCOPE


def predict_paths(node_config: Mapping[str, Any]) -> tuple[Path, Path]:
    """The node's input texts and its output file; ProtocolError when it names no input."""
    source = node_config.get(INPUT_CONFIG)
    if not isinstance(source, str) or not source:
        raise ProtocolError(f"this node has no texts to classify (node config {INPUT_CONFIG}: a text file, "
                            "one text per line)")
    target = node_config.get(OUTPUT_CONFIG) or f"{source}.preds.jsonl"
    if not isinstance(target, str):
        raise ProtocolError(f"node config {OUTPUT_CONFIG}: expected a path, got {target!r}")
    return Path(source), Path(target)


def predict_texts(context: Context, config: RunConfig, settings: FlowerSettings) -> tuple[list[str], TokenizedDataset]:
    """The node's texts and their tokens (cached while the file is unchanged)."""
    source, _ = predict_paths(context.node_config)
    try:
        stamp = source.stat().st_mtime_ns
    except OSError as exc:
        raise ProtocolError(f"{source}: {INPUT_CONFIG} not readable ({exc.strerror})") from None
    return _tokenized(str(source), stamp, config.model, config.max_length, run_labels(config, settings))


@functools.lru_cache(maxsize=4)
def _tokenized(source: str, stamp: int, model: str, max_length: int,
               label_names: tuple[str, ...]) -> tuple[list[str], TokenizedDataset]:
    try:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{source}: cannot read {INPUT_CONFIG} ({exc})") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ProtocolError(f"{source}: empty {INPUT_CONFIG} (expected one text per line)")
    data = TextDataset(texts, [0] * len(texts), list(label_names))
    return texts, TokenizedDataset(data, load_tokenizer(model), max_length)


def start_output(context: Context) -> None:
    """An empty output file (the first batch of a prediction pass)."""
    _, target = predict_paths(context.node_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("", encoding="utf-8")


def append_predictions(context: Context, config: RunConfig, settings: FlowerSettings,
                       batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Append one JSON line per row of every (row indices of the texts, logits) batch; how many."""
    _, target = predict_paths(context.node_config)
    texts, names = predict_texts(context, config, settings)[0], run_labels(config, settings)
    done = 0
    with target.open("a", encoding="utf-8") as handle:
        for indices, logits in batches:
            for index, row in zip(indices.tolist(), torch.softmax(logits.double(), dim=-1)):
                values, order = row.sort(descending=True)
                line = {"text": texts[int(index)], "label": names[int(order[0])],
                        "probabilities": {names[int(i)]: round(float(v), 6) for v, i in zip(values, order)}}
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            done += int(indices.numel())
        handle.flush()
        os.fsync(handle.fileno())
    return done
