"""Inference a tenant can use: load a trained run's saved parties and classify new texts.

:class:`SplitClassifier` reads the tenant's and the cloud's state (and the dealer's in secure
mode) written by ``flower-split train --out DIR``, rebuilds the parties through the run's
security backend and runs the split inference protocol for every batch: head on the tenant,
body on the cloud, tail on the tenant — in secure mode the 2PC protocol itself, with the
logits opened to the tenant only. Nothing is re-implemented in plaintext::

    clf = SplitClassifier.load("runs/x")            # runs/x/state, or a state directory
    clf.predict(["card got declined"])[0].label     # -> 'declined_card_payment'
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from flower_split.backends import get_backend
from flower_split.backends.saved import Restored, SavedRun, load_common
from flower_split.data import TextDataset, TokenizedDataset
from flower_split.model import load_tokenizer
from flower_split.state import StateError, find_state_root, only_tenant
from flower_split.train.runtime import CpuClock, select_device


@dataclass
class Prediction:
    """One text's predicted label and the probabilities of the top classes (all by default)."""

    text: str
    label: str
    index: int
    probabilities: dict[str, float]

    def to_json(self) -> dict[str, object]:
        return {"text": self.text, "label": self.label, "probabilities": self.probabilities}


class SplitClassifier:
    """A tenant's trained split model, served by the split inference protocol in this process."""

    def __init__(self, run: SavedRun, restored: Restored) -> None:
        self.run = run
        self.restored = restored
        self.tokenizer = load_tokenizer(run.config.model)
        self.clock = CpuClock()

    @classmethod
    def load(cls, path: str | Path, tenant: str | None = None, device: str = "cpu") -> SplitClassifier:
        """Load the run saved under ``path`` (a ``train --out`` directory or its ``state``).

        ``tenant``: which tenant's model (default: the only one saved). :class:`StateError`
        names the file when the state is missing, corrupt, of another format version, or was
        trained with another model than the one that loads now.
        """
        root = find_state_root(path)
        run = load_common(root, tenant or only_tenant(root))
        backend = get_backend(str(run.tenant.meta.get("security")))
        return cls(run, backend.restore(run, select_device(device)))

    @property
    def label_names(self) -> list[str]:
        return list(self.run.label_names)

    def predict(self, texts: Sequence[str], batch_size: int | None = None, top_k: int | None = None,
                progress: bool = False) -> list[Prediction]:
        """Classify ``texts`` in batches (default: the run's batch size); ``top_k`` classes per text."""
        texts = _check_texts(texts)
        size = batch_size or self.run.config.batch_size
        if size <= 0:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        data = TokenizedDataset(TextDataset(texts, [0] * len(texts), self.label_names), self.tokenizer,
                                self.run.config.max_length)
        batches = -(-len(texts) // size)
        self.restored.reserve_steps(batches)
        session = self.restored.session
        out: list[Prediction] = []
        bar = tqdm(data.batches(size, shuffle=False), total=batches, desc="predict", unit="batch",
                   disable=not progress)
        for batch in bar:
            step = session.run_step(batch, False, self.clock)
            probabilities = torch.softmax(session.pop_result(step).logits.double(), dim=-1)
            out.extend(self._prediction(texts[int(i)], row, top_k)
                       for i, row in zip(batch.indices, probabilities))
        return out

    def _prediction(self, text: str, probabilities: torch.Tensor, top_k: int | None) -> Prediction:
        k = len(self.label_names) if not top_k else min(top_k, len(self.label_names))
        values, indices = probabilities.topk(k)
        names = self.label_names
        top = {names[int(i)]: round(float(v), 6) for v, i in zip(values, indices)}
        return Prediction(text, names[int(indices[0])], int(indices[0]), top)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got one string (wrap it in a list)")
    texts = list(texts)
    if not texts:
        raise ValueError("texts: nothing to classify (empty input)")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"texts[{i}]: expected a non-empty string, got {text!r}")
    return texts


def read_texts(path: str | Path) -> list[str]:
    """One text per line of a UTF-8 file (blank lines skipped); ValueError naming the file if none."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: input file not found")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: empty input (expected one text per line)")
    return texts


def write_jsonl(path: str | Path, predictions: Sequence[Prediction]) -> Path:
    """One JSON line per prediction, written atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for prediction in predictions:
            handle.write(json.dumps(prediction.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def main_predict(args: Namespace) -> int:
    """``flower-split predict``: classify ``--input`` with the state of ``--state`` into ``--out``."""
    try:
        texts = read_texts(args.input)
        classifier = SplitClassifier.load(args.state, tenant=args.tenant, device=args.device)
        predictions = classifier.predict(texts, args.batch_size, args.top_k or None, progress=not args.no_progress)
    except (StateError, ValueError) as exc:
        print(f"flower-split: predict: {exc}", file=sys.stderr)
        return 2
    path = write_jsonl(args.out, predictions)
    security = classifier.run.tenant.meta.get("security")
    print(f"{len(predictions)} predictions ({security}, tenant {classifier.run.tenant_id}) -> {path}")
    return 0


__all__ = ["Prediction", "SplitClassifier", "StateError", "main_predict", "read_texts", "write_jsonl"]
