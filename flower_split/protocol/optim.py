"""The optimizers and the learning-rate schedule of every trainer, plain and secure.

Plain (and centralized, FedAvg) training uses torch's optimizers (:func:`make_optimizer`)
with the warm-up + cosine schedule (:func:`warmup_cosine`). Secure training applies the same
SGD rule to each party's half of a shared weight (:func:`sgd_share_update`) with the same
schedule (:func:`lr_factor`, computed by both parties from public values).

SGD with momentum applied by each party to its own half of a secret-shared weight.

Why only linear optimizers work: the weights are shared as ``w = w_cloud + w_client`` and
the gradient as ``g = g_cloud + g_client``. Each party may update only its own half, from
its own gradient share and its own earlier state, without talking to the other party. An
update rule keeps the sum exact exactly when it is linear in (w, g, state) with public
coefficients: SGD, momentum, weight decay and a public learning-rate schedule are
(``buf = mu buf + g + wd w``, ``w -= lr buf``, applied to each half, sums to the same
rule on the whole). Adam/AdamW divide by ``sqrt(v)`` with ``v`` a running mean of ``g^2``:
squares, square roots and divisions of shared values need 2PC protocols (and rounds) for
every parameter at every step, so they cannot be done locally on shares. The secure
backend (``flower_split.backends.secure``) therefore refuses any optimizer but ``sgd``.

Fixed point: a gradient share carries ``frac_bits`` fractional bits and is the share of
``2^grad_scale_bits * g`` (gradient scaling: the mean-loss gradients per token are
~1e-4, a handful of LSBs at 16 fractional bits; scaling them by 256 before they enter the
2PC backward keeps 8 more bits of precision, and the update divides the scale back out).
Multiplications by the public momentum and learning rate are local truncations
(``AdditiveShare.mul_public`` / ``truncate``): error < 1 LSB each, and the usual failure
probability ~|v| 2^(2f-64) per element (docs/mpc.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flower_split.mpc import AdditiveShare, encode


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
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_fraction))


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """The learning-rate factor at update ``step`` (:func:`warmup_cosine` and secure training).

    Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to zero; both
    parties compute it from public values, so their learning rates agree bit for bit.
    """
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sgd_share_update(weight: torch.Tensor, buf: torch.Tensor | None, grad: torch.Tensor, party: int,
                     lr: float, momentum: float, weight_decay: float, frac_bits: int,
                     grad_scale_bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SGD(momentum, weight decay) update of one party's half; returns (weight, buffer).

    Args:
        weight: this party's half of w (int64 ring, ``frac_bits``).
        buf: this party's half of the momentum buffer (of the scaled gradient) or None
            before the first update (torch's SGD starts the buffer at the first gradient).
        grad: this party's share of ``2^grad_scale_bits * dL/dw`` (``frac_bits``).
        lr: the learning rate of this update (public; already multiplied by the schedule).

    Exactly torch.optim.SGD(dampening=0, nesterov=False) on the sum of the halves, up to
    fixed-point rounding: ``d = g + wd w``; ``buf = mu buf + d`` (``buf = d`` the first
    time, or without momentum); ``w -= lr buf``.
    """
    scale = 1 << grad_scale_bits
    w = AdditiveShare(weight, party, frac_bits)
    d = AdditiveShare(grad, party, frac_bits)
    if weight_decay:
        d = d + w.mul_public(weight_decay * scale)
    if momentum and buf is not None:
        d = AdditiveShare(buf, party, frac_bits).mul_public(momentum) + d
    new_buf = d.data if momentum else None
    # lr * buf / scale in one local truncation: lr is encoded with frac_bits bits, the
    # product carries 2 frac_bits + grad_scale_bits and is truncated back to frac_bits.
    lr_ring = encode(float(lr), frac_bits)
    product = AdditiveShare(d.data * lr_ring, party, 2 * frac_bits + grad_scale_bits)
    step = product.truncate(frac_bits + grad_scale_bits)
    return (w - step).data, new_buf
