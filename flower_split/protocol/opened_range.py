"""The cloud's range check on a value opened to it (the head output f, the gradient dL/dh).

A fixed-point value far out of range means the step is garbage: it refuses it with the size
and the likely causes, rather than run the body on it.
"""

from __future__ import annotations

import torch

from flower_split.protocol.messages import ProtocolError

OPENED_LIMIT = 1e6  # |value| of an opened activation or gradient beyond which the step is refused


def check_opened(item: str, what: str, value: torch.Tensor) -> None:
    """Refuse an opened value that is not finite or beyond :data:`OPENED_LIMIT`: the tenant's
    training diverged (it grows ~10x a step first), a truncation failed (docs/mpc.md) or a
    party sent garbage; the cloud computes nothing on it."""
    largest = float(value.abs().max()) if value.numel() else 0.0
    if not bool(torch.isfinite(value).all()) or largest > OPENED_LIMIT:
        raise ProtocolError(f"{item}: the opened {what} is out of range (|max| {largest:.3g} > {OPENED_LIMIT:g}): "
                            "the tenant's training diverged (lower lr-head / lr-tail), a fixed-point "
                            "truncation failed, or a party sent garbage")
