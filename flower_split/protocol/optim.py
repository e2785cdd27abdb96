"""Optimizers and learning-rate schedule shared by every trainer."""

from __future__ import annotations

import math

import torch
from torch import nn


def make_optimizer(name: str, module: nn.Module, lr: float, momentum: float,
                   weight_decay: float, lr_of: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """``sgd`` (with momentum; the only rule secure mode can apply to shares) or ``adamw``.

    ``lr_of`` gives some child modules (by attribute name, e.g. ``{"classifier": 0.5}``)
    their own learning rate; every other trainable parameter uses ``lr``. The learning-rate
    schedule scales every group alike.
    """
    lr_of = lr_of or {}
    special = {id(p) for child in lr_of for p in getattr(module, child).parameters()}
    params: list[dict] = [{"params": [p for p in module.parameters() if p.requires_grad and id(p) not in special]}]
    params += [{"params": [p for p in getattr(module, child).parameters() if p.requires_grad], "lr": child_lr}
               for child, child_lr in lr_of.items()]
    params = [group for group in params if group["params"]]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown {name!r}")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to zero."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
