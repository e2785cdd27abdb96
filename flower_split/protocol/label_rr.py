"""Label-DP by randomized response: each training label replaced once, before any use.

Why a second mechanism: Gaussian noise on ``g`` (:mod:`label_dp`) composes over every use of a
label, and at epsilon <= 7 it drowned the short runs we measured (PRIVACY.md). Randomized
response (Warner 1965; for label-DP in deep learning, Ghazi et al., "Deep Learning with
Label Differential Privacy", NeurIPS 2021) keeps an example's label with probability
``p = e^eps / (e^eps + K - 1)`` and otherwise draws one of the other ``K - 1`` labels
uniformly. Each training label is drawn **once** (a tenant secret key and the example's
index fix the draw): everything computed from the randomized labels afterwards — ``dL/dh``,
the logits' gradients, the loss, every epoch — is post-processing, so the whole run is
``eps``-label-DP (pure, no delta), however long it trains.

The draw: ``HMAC-SHA256(key, index)`` gives two uniforms, one for keep-or-replace and one for
the replacement. The key comes from ``secrets`` and stays with the tenant (over Flower in its
``Context.state``, so every message sees the same labels; a fresh key per message would be a
fresh draw per use, and the guarantee would compose away).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct

import torch

KEY_BYTES = 32


def keep_probability(epsilon: float, classes: int) -> float:
    """Probability that randomized response keeps the true label: e^eps / (e^eps + K - 1)."""
    if not epsilon > 0 or classes < 2:
        raise ValueError(f"randomized response needs epsilon > 0 and >= 2 classes, got {epsilon!r}, {classes!r}")
    return 1.0 / (1.0 + (classes - 1) * math.exp(-epsilon))


class RandomizedLabels:
    """One tenant's randomized training labels: a fixed function of (key, example index, label)."""

    def __init__(self, epsilon: float, classes: int, key: bytes | None = None) -> None:
        self.epsilon = float(epsilon)
        self.classes = int(classes)
        self.keep = keep_probability(self.epsilon, self.classes)
        self.key = secrets.token_bytes(KEY_BYTES) if key is None else key
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"randomized response: the key must be {KEY_BYTES} bytes")

    def label(self, index: int, true_label: int) -> int:
        """The randomized label of example ``index`` (the same at every call)."""
        digest = hmac.new(self.key, struct.pack(">Q", index), hashlib.sha256).digest()
        keep_draw, other_draw = (int.from_bytes(digest[i:i + 8], "big") / 2.0 ** 64 for i in (0, 8))
        if keep_draw < self.keep:
            return int(true_label)
        other = int(other_draw * (self.classes - 1))  # uniform over the K - 1 other labels
        return other + (other >= true_label)

    def apply(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Randomized labels of a batch (``indices``: the examples' rows in the tenant's data)."""
        out = [self.label(int(i), int(y)) for i, y in zip(indices.tolist(), labels.tolist())]
        return torch.tensor(out, dtype=labels.dtype, device=labels.device)

    def summary(self) -> dict[str, float]:
        """The results.json entries of the guarantee."""
        return {"label_rr_epsilon": self.epsilon, "label_rr_keep_probability": self.keep}
