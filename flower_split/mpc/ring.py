"""The ring Z_2^64 as torch int64 tensors, and fixed-point encoding into it.

Ring elements are stored as signed int64 two's-complement tensors; torch's int64
addition, subtraction and multiplication wrap modulo 2^64, which is exactly ring
arithmetic, so no explicit reduction is ever needed.

A real value v is encoded as the ring element round(v * 2^f), read as a signed
integer, where f is the number of fractional bits (default 16).

Representable range and errors (f fractional bits):

* storage: |v| < 2^(63-f) (f=16: about 1.4e14); ``encode`` rejects anything larger;
* resolution (one LSB): 2^-f (f=16: 1.5e-5); encoding rounds to nearest, so
  |decode(encode(v)) - v| <= 2^-(f+1);
* a product of two f-bit encodings carries 2f fractional bits, so before it is
  truncated it must satisfy |v| < 2^(63-2f) (f=16: |v| < 2^31, about 2.1e9);
* ``decode`` goes through float64 and is exact while |v| * 2^f <= 2^53
  (f=16: |v| <= 2^37).
"""

from __future__ import annotations

import torch
from torch import Tensor

RING_BITS = 64
"""The ring is Z_2^RING_BITS."""

DEFAULT_FRAC_BITS = 16
"""Default number of fractional bits of the fixed-point encoding."""

MAX_FRAC_BITS = 62
"""Largest accepted number of fractional bits (keeps at least one integer bit)."""


def check_frac_bits(frac_bits: object) -> int:
    """Return ``frac_bits`` if it is an int in [0, MAX_FRAC_BITS], else raise.

    Raises:
        TypeError: not an int (bools are rejected too).
        ValueError: out of range.
    """
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int):
        raise TypeError(f"frac_bits must be an int, got {type(frac_bits).__name__}")
    if not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(f"frac_bits must be in [0, {MAX_FRAC_BITS}], got {frac_bits}")
    return frac_bits


def check_ring_tensor(value: object, what: str = "ring tensor") -> Tensor:
    """Return ``value`` if it is an int64 tensor, else raise a TypeError naming ``what``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.int64:
        raise TypeError(f"{what} must have dtype torch.int64 (ring Z_2^64), got {value.dtype}")
    return value


def max_abs_value(frac_bits: int = DEFAULT_FRAC_BITS) -> float:
    """Largest magnitude (exclusive) that ``encode`` accepts with ``frac_bits`` fractional bits."""
    return 2.0 ** (RING_BITS - 1 - check_frac_bits(frac_bits))


def encode(values: Tensor | float | int, frac_bits: int = DEFAULT_FRAC_BITS) -> Tensor:
    """Encode real values as fixed-point ring elements round(v * 2^frac_bits).

    Floating inputs are rounded to nearest (error <= 2^-(frac_bits+1)); integer and
    bool inputs are encoded exactly.

    Raises:
        ValueError: a value is NaN, infinite, or |v| >= 2^(63 - frac_bits).
    """
    check_frac_bits(frac_bits)
    # Python floats are doubles: keep them so (torch would default to float32).
    tensor = torch.as_tensor(values, dtype=torch.float64 if isinstance(values, float) else None)
    limit = 2 ** (RING_BITS - 1 - frac_bits)
    if not tensor.is_floating_point() and not tensor.is_complex():
        as_int = tensor.to(torch.int64)
        if as_int.numel() and bool((as_int.abs() >= limit).any() | (as_int == -(2**63)).any()):
            raise ValueError(f"integer value out of fixed-point range |v| < 2^{RING_BITS - 1 - frac_bits}")
        return as_int * (1 << frac_bits)
    if tensor.is_complex():
        raise TypeError("complex values cannot be encoded in the ring")
    scaled = torch.round(tensor.to(torch.float64) * float(2**frac_bits))
    if scaled.numel() and not bool(torch.isfinite(scaled).all()):
        raise ValueError("cannot encode NaN or infinite values")
    if scaled.numel() and bool((scaled.abs() >= 2.0 ** (RING_BITS - 1)).any()):
        raise ValueError(
            f"value out of fixed-point range |v| < 2^{RING_BITS - 1 - frac_bits} "
            f"(max |v| given: {scaled.abs().max().item() / 2**frac_bits:.6g})"
        )
    return scaled.to(torch.int64)


def decode(ring: Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> Tensor:
    """Decode ring elements to float64 values ring / 2^frac_bits (signed reading).

    Exact while |ring| <= 2^53; beyond that float64 rounding applies.
    """
    check_ring_tensor(ring)
    return ring.to(torch.float64) / float(2 ** check_frac_bits(frac_bits))
