"""Fixed-point encoding into the ring Z_2^64 (int64, two's complement).

The mpc layer owns ring arithmetic; this module keeps only what the HE layer needs to
hand over its gradient shares in the same representation: a real x is the ring element
round(x * 2**frac_bits) mod 2**64, and two shares add with int64 wrap-around.
"""

from __future__ import annotations

import numpy as np
import torch

_RING = 1 << 64
_HALF = 1 << 63


def encode_fixed(x: torch.Tensor, frac_bits: int = 16) -> torch.Tensor:
    """round(x * 2**frac_bits) as int64; x must be finite with |x| * 2**frac_bits < 2**63."""
    scaled = torch.round(x.detach().to(torch.float64) * 2.0**frac_bits)
    if scaled.numel() and (not torch.isfinite(scaled).all() or scaled.abs().max().item() >= 2.0**63):
        raise ValueError(f"encode_fixed: values must be finite and below 2^{63 - frac_bits} in magnitude")
    return scaled.to(torch.int64)


def decode_fixed(x: torch.Tensor, frac_bits: int = 16) -> torch.Tensor:
    """Real value of int64 ring elements read as signed fixed point."""
    if x.dtype != torch.int64:
        raise ValueError(f"decode_fixed: expected int64 ring elements, got {x.dtype}")
    return x.to(torch.float64) / 2.0**frac_bits


def wrap_ints(values: np.ndarray) -> np.ndarray:
    """Python integers (object array) reduced mod 2**64 into signed int64."""
    return ((values + _HALF) % _RING - _HALF).astype(np.int64)
