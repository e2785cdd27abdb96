"""The range check on a value a party opens (the cloud: the head output f, dL/dh, and the
logits z in ``he`` mode; the client: the logits z).

A fixed-point value far out of range means the step is garbage: the party refuses it with the
size and the likely causes, rather than compute on it, and raises :class:`OutOfRange` so that
the step's drop also undoes the step before it (:mod:`~flower_split.protocol.secure_rollback`).
"""

from __future__ import annotations

import torch

from flower_split.protocol.messages import ProtocolError

# |value| beyond which an opened value refuses the step. Measured on MiniLM / Banking77 at the
# headline learning rates (simulations/truncation_wraps.py run, two rounds of tenant 3): |f| <= 6.5,
# |z| <= 27.5, |dL/dh| <= 1.1. A failed truncation is off by ~2^32, or by lr * 2^24 once it went
# through a weight update: f and z are refused ~1000x above the measured values, to refuse the
# second early (the closer, the sooner it shows: docs/secure.md) without refusing a sound step.
# dL/dh stays at 1e6: label DP's noise on g makes it large by design (1.3e4 seen on the tiny model).
HEAD_OUTPUT_LIMIT = 1e4
LOGITS_LIMIT = 1e4
GRADIENT_LIMIT = 1e6


class OutOfRange(ProtocolError):
    """An opened value beyond its limit (or not finite): the tenant's halves may hold garbage."""


def check_opened(item: str, what: str, value: torch.Tensor, limit: float, show_size: bool = True) -> None:
    """Refuse an opened value that is not finite or beyond ``limit``: the tenant's training
    diverged (it grows ~10x a step first), a truncation failed (docs/mpc.md) or a party sent
    garbage; the party computes nothing on it. ``show_size``: name the largest |value| in the
    error (False on the client: its error reply reaches the cloud, and the logits are its own)."""
    largest = float(value.abs().max()) if value.numel() else 0.0
    if not bool(torch.isfinite(value).all()) or largest > limit:
        size = f"|max| {largest:.3g} > {limit:g}" if show_size else f"beyond {limit:g} or not finite"
        raise OutOfRange(f"{item}: the opened {what} is out of range ({size}): the tenant's training diverged "
                         "(lower lr-head / lr-tail), a fixed-point truncation failed, or a party sent garbage")
