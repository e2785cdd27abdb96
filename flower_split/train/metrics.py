"""Classification metrics computed from predicted and true labels."""

from __future__ import annotations

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions == labels).float().mean()) if len(labels) else 0.0


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``labels`` or ``predictions``."""
    scores = []
    for c in range(num_classes):
        predicted, actual = predictions == c, labels == c
        if not predicted.any() and not actual.any():
            continue
        true_positive = float((predicted & actual).sum())
        precision = true_positive / max(1.0, float(predicted.sum()))
        recall = true_positive / max(1.0, float(actual.sum()))
        scores.append(0.0 if true_positive == 0 else 2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores) if scores else 0.0
