"""Uniform random integers from the operating system's CSPRNG (``os.urandom``).

Masks and flooding noise hide secrets, so they come from a cryptographically secure
source, never from a seeded PRNG. Rejection sampling makes them exactly uniform.
"""

from __future__ import annotations

import os

import numpy as np


def _words(count: int) -> np.ndarray:
    return np.frombuffer(os.urandom(8 * count), dtype=np.uint64)


def _overdraw(needed: int, bound: int, bits: int) -> int:
    """Draws to make so that, accepting each with probability bound / 2**bits, enough
    usually survive (the caller loops otherwise)."""
    return int(needed * (1 << bits) / bound * 1.05) + 16


def uniform_residues(modulus: int, size: int) -> np.ndarray:
    """``size`` integers uniform in ``[0, modulus)`` as uint64; ``modulus`` below 2**63."""
    if not 1 < modulus < 1 << 63:
        raise ValueError(f"modulus={modulus}: must be in (1, 2**63)")
    bits = (modulus - 1).bit_length()
    mask = np.uint64((1 << bits) - 1)
    out = np.empty(size, dtype=np.uint64)
    filled = 0
    while filled < size:
        draw = _words(_overdraw(size - filled, modulus, bits)) & mask
        draw = draw[draw < np.uint64(modulus)][: size - filled]
        out[filled : filled + draw.size] = draw
        filled += draw.size
    return out


def uniform_below(bound: int, size: int) -> np.ndarray:
    """``size`` Python integers uniform in ``[0, bound)``, any ``bound > 0`` (object array)."""
    if bound < 1:
        raise ValueError(f"bound={bound}: must be >= 1")
    bits = (bound - 1).bit_length()
    if bits == 0:
        return np.zeros(size, dtype=object)
    words = -(-bits // 64)
    mask = (1 << bits) - 1
    out = np.empty(size, dtype=object)
    filled = 0
    while filled < size:
        want = _overdraw(size - filled, bound, bits)
        value = np.zeros(want, dtype=object)
        for _ in range(words):
            value = (value << 64) | _words(want).astype(object)
        value = value & mask
        value = value[value < bound][: size - filled]
        out[filled : filled + value.size] = value
        filled += value.size
    return out
