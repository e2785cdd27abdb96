"""A tenant's prior offset: the log of its own label frequencies, added to its model's logits.

With ``prior_offset`` a tenant trains and predicts with ``z + log p_tenant`` instead of ``z``
(logit adjustment, as in FedLC): the offset explains the tenant's label skew, so its local
training need not pull shared weights towards its own prior, and its predictions still follow
it. The offset is personal: a buffer, never a parameter, so it is neither trained nor averaged
(FedAvg and cross-tenant sharing move parameters only). Computed from the tenant's own training
labels; nothing about it leaves the tenant except through what its model computes anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def log_label_frequencies(labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """``log`` of the Laplace-smoothed frequencies of ``labels`` over ``num_classes`` classes
    (finite for a class the tenant never saw), float32 [num_classes]."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim != 1 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes)):
        raise ValueError(f"labels: expected a 1-D sequence of class indices in [0, {num_classes})")
    counts = torch.bincount(labels, minlength=num_classes).float()
    return torch.log((counts + 1) / (labels.numel() + num_classes))
