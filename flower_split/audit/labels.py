"""Label inference from what the cloud sees per example: ``dL/dh`` and, in ``he`` mode, ``z``.

Features: :func:`pooled_gradients` (``dL/dh`` mean-pooled over each example's real tokens)
and :func:`logit_features`. The attacks return one guessed label per example and which
examples count in the score (the attacker's known examples do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from flower_split.audit.transcript import GroundTruth, StepView
from flower_split.model import masked_mean


@dataclass
class LabelGuess:
    """Guessed label per example [N] and whether it is scored [N]."""

    labels: torch.Tensor
    scored: torch.Tensor


def pooled_gradients(views: Sequence[StepView], truth: Sequence[GroundTruth]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example ``dL/dh`` mean-pooled over its real tokens [N, d] (as is when opened per
    sequence), and the examples' true labels [N], over every step that opened ``dL/dh``."""
    rows, labels = [], []
    for view, known in zip(views, truth):
        if view.grad_h is None:
            continue
        grad = view.grad_h
        rows.append(grad if grad.dim() == 2 else masked_mean(grad, view.attention_mask))
        labels.append(known.labels)
    return _stack(rows, labels)


def logit_features(views: Sequence[StepView], truth: Sequence[GroundTruth]) -> tuple[torch.Tensor, torch.Tensor]:
    """The opened logits ``z`` [N, C] and the true labels [N], over every step that opened ``z``."""
    rows = [v.z for v in views if v.z is not None]
    labels = [t.labels for v, t in zip(views, truth) if v.z is not None]
    return _stack(rows, labels)


def _stack(rows: list[torch.Tensor], labels: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    if any(label is None for label in labels):
        raise ValueError("audit: a step that opened a label-dependent value has no recorded labels")
    return torch.cat(rows).float(), torch.cat(labels)  # type: ignore[arg-type]


def known_examples(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Mask [N] of ``k`` random examples of every class (all of a class with at most ``k``)."""
    generator = torch.Generator().manual_seed(seed)
    known = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        known[members[torch.randperm(len(members), generator=generator)[:k]]] = True
    return known


class NearestCentroidAttack:
    """Threat model: the cloud holds one vector per example (pooled ``dL/dh``, or ``z``) and
    knows the labels of ``k`` examples of each class (e.g. requests it submitted itself or
    labels made public). It averages the unit-normalised vectors of each class's known
    examples into a centroid and gives every other example the label of the centroid with
    the highest cosine similarity. Classes without a known example are never guessed."""

    def __init__(self, k: int, seed: int = 0, name: str = "nearest_centroid") -> None:
        self.k, self.seed = k, seed
        self.name = f"{name}_k{k}"

    def guess(self, features: torch.Tensor, labels: torch.Tensor) -> LabelGuess:
        known = known_examples(labels, self.k, self.seed)
        unit = F.normalize(features, dim=1)
        classes = labels[known].unique()
        centroids = torch.stack([unit[known & (labels == c)].mean(0) for c in classes])
        guessed = classes[(unit @ F.normalize(centroids, dim=1).T).argmax(1)]
        return LabelGuess(guessed, ~known)


class KMeansAttack:
    """Threat model (an upper bound): the cloud holds one vector per example and no label at
    all. It clusters the unit-normalised vectors into as many clusters as there are classes
    (spherical k-means, k-means++ start); the score then maps clusters to labels by the
    best one-to-one assignment against the truth (Hungarian), which an attacker could not
    do without labels, so it bounds what the clusters reveal from above."""

    name = "kmeans_hungarian"

    def __init__(self, num_classes: int, iterations: int = 50, seed: int = 0) -> None:
        self.num_classes, self.iterations, self.seed = num_classes, iterations, seed

    def clusters(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster index of every row [N]."""
        unit = F.normalize(features, dim=1)
        generator = torch.Generator().manual_seed(self.seed)
        count = min(self.num_classes, len(unit))
        centres = unit[torch.randint(len(unit), (1,), generator=generator)]
        while len(centres) < count:  # k-means++: next centre far from the chosen ones
            distance = (1 - unit @ centres.T).min(1).values.clamp_min(0)
            weights = distance if float(distance.sum()) > 0 else torch.ones(len(unit))
            centres = torch.cat([centres, unit[torch.multinomial(weights, 1, generator=generator)]])
        for _ in range(self.iterations):
            assign = (unit @ centres.T).argmax(1)
            moved = F.one_hot(assign, len(centres)).T.to(unit.dtype) @ unit
            empty = moved.norm(dim=1) == 0
            centres = torch.where(empty.unsqueeze(1), centres, F.normalize(moved, dim=1))
        return (unit @ centres.T).argmax(1)

    def guess(self, features: torch.Tensor, labels: torch.Tensor) -> LabelGuess:
        assign = self.clusters(features)
        agreement = torch.zeros(int(assign.max()) + 1, self.num_classes)
        agreement.index_put_((assign, labels), torch.ones(len(labels)), accumulate=True)
        rows, cols = linear_sum_assignment(agreement.numpy(), maximize=True)
        mapping = torch.full((agreement.shape[0],), -1, dtype=torch.long)
        mapping[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        return LabelGuess(mapping[assign], torch.ones(len(labels), dtype=torch.bool))


class LogitArgmaxAttack:
    """Threat model: the cloud holds the opened logits ``z`` (``he`` mode) and the public
    class order; it takes the predicted class ``argmax z`` as the label (right whenever the
    model is right on its training example)."""

    name = "argmax"

    def guess(self, features: torch.Tensor, labels: torch.Tensor) -> LabelGuess:
        return LabelGuess(features.argmax(1), torch.ones(len(labels), dtype=torch.bool))
