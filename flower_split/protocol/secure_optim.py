"""SGD with momentum applied by each party to its own half of a secret-shared weight.

Why only linear optimizers work: the weights are shared as ``w = w_cloud + w_client`` and
the gradient as ``g = g_cloud + g_client``. Each party may update only its own half, from
its own gradient share and its own earlier state, without talking to the other party. An
update rule keeps the sum exact exactly when it is linear in (w, g, state) with public
coefficients: SGD, momentum, weight decay and a public learning-rate schedule are
(``buf = mu buf + g + wd w``, ``w -= lr buf``, applied to each half, sums to the same
rule on the whole). Adam/AdamW divide by ``sqrt(v)`` with ``v`` a running mean of ``g^2``:
squares, square roots and divisions of shared values need 2PC protocols (and rounds) for
every parameter at every step, so they cannot be done locally on shares. ``RunConfig``
therefore refuses any optimizer but ``sgd`` in secure mode.

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

from flower_split.mpc import AdditiveShare, encode


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """The schedule of ``flower_split.protocol.optim.warmup_cosine`` at update ``step``.

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
