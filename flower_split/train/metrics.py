"""Classification metrics computed from predicted and true labels.

Macro-F1 goes through per-class counts (true positives, false positives, false negatives)
so that a tenant evaluating in several Flower messages can report counts per message and
the strategy can sum them: the F1 of summed counts equals the F1 of all predictions at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


def class_counts(predictions: torch.Tensor, labels: torch.Tensor,
                 num_classes: int) -> tuple[list[int], list[int], list[int]]:
    """Per-class (true positives, false positives, false negatives)."""
    predictions, labels = predictions.long().cpu(), labels.long().cpu()
    hit = predictions == labels
    tp = torch.bincount(labels[hit], minlength=num_classes)
    predicted = torch.bincount(predictions, minlength=num_classes)
    actual = torch.bincount(labels, minlength=num_classes)
    return tp.tolist(), (predicted - tp).tolist(), (actual - tp).tolist()


def macro_f1_from_counts(tp: Sequence[int], fp: Sequence[int], fn: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes that were predicted or present."""
    scores = []
    for t, p, n in zip(tp, fp, fn):
        if t + p + n == 0:
            continue
        scores.append(float(2 * t / (2 * t + p + n)))
    return sum(scores) / len(scores) if scores else 0.0


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``labels`` or ``predictions``."""
    return macro_f1_from_counts(*class_counts(predictions, labels, num_classes))
