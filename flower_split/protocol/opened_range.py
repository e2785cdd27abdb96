"""The range check on a value a party opens (the cloud: the head output f, dL/dh, and the
logits z in ``he`` mode; the client: the logits z).

A fixed-point value far out of range means the step is garbage: the party refuses it with the
size and the likely causes, rather than compute on it, and raises :class:`OutOfRange` so that
the step's drop also undoes the step before it (:mod:`~flower_split.protocol.secure_rollback`).
"""

from __future__ import annotations

import torch

from flower_split.protocol.messages import ProtocolError

OPENED_LIMIT = 1e6  # |value| of an opened activation or gradient beyond which the step is refused


class OutOfRange(ProtocolError):
    """An opened value beyond :data:`OPENED_LIMIT` (or not finite): the tenant's halves may hold garbage."""


def check_opened(item: str, what: str, value: torch.Tensor) -> None:
    """Refuse an opened value that is not finite or beyond :data:`OPENED_LIMIT`: the tenant's
    training diverged (it grows ~10x a step first), a truncation failed (docs/mpc.md) or a
    party sent garbage; the party computes nothing on it."""
    largest = float(value.abs().max()) if value.numel() else 0.0
    if not bool(torch.isfinite(value).all()) or largest > OPENED_LIMIT:
        raise OutOfRange(f"{item}: the opened {what} is out of range (|max| {largest:.3g} > {OPENED_LIMIT:g}): "
                         "the tenant's training diverged (lower lr-head / lr-tail), a fixed-point "
                         "truncation failed, or a party sent garbage")
