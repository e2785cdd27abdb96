"""Exact matrix multiplication in Z_2^64 through float64 matmuls on limbs.

PyTorch's int64 matmul on CPU has no BLAS kernel and is ~20x slower than float64.
Float64 represents every integer of magnitude <= 2^53 exactly, so a matmul of
small-integer float64 matrices is exact as long as every partial sum stays within
2^53, whatever order or fused multiply-adds the BLAS uses.

Each int64 operand is split into L = ceil(64 / w) signed "balanced" limbs of w bits,
x = sum_i d_i 2^(w i) (mod 2^64), with |d_i| <= 2^(w-1) (the top limb is what is
left of the signed value after the lower limbs: |d_top| <= 2^(63 - w (L-1))). Then

    a @ b = sum_{s < L} 2^(w s) * S_s  (mod 2^64),   S_s = sum_{i+j=s} A_i @ B_j

where pairs with i + j >= L vanish because w (i + j) >= 64.  Each S_s is one float64
matmul of the limbs concatenated along the inner dimension, [A_0 .. A_s] @ [B_s; ..; B_0];
it is exact when the inner dimension k satisfies k * beta <= 2^53 with beta the largest
per-term bound sum_{i+j=s} |d_i|max |d_j|max.  Longer inner dimensions are chunked
and the int64 partial results summed (wrapping).  The S_s are rounded-free integers,
converted to int64 and combined by Horner's rule with wrapping int64 arithmetic.

w = 22 (default) gives L = 3 limbs, 6 limb products in 3 matmuls, and k <= 1024 per
chunk; w = 16 gives 4 limbs and 10 limb products with k <= 2^21.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ring import RING_BITS, check_ring_tensor

DEFAULT_LIMB_BITS = 22
"""Default limb width: 3 limbs per int64, hence 6 limb products per ring matmul."""

MIN_LIMB_BITS = 8
MAX_LIMB_BITS = 26
_FLOAT64_EXACT = 2**53


def _limb_bounds(limb_bits: int) -> list[int]:
    """Largest magnitude of each balanced limb of a signed 64-bit value."""
    count = math.ceil(RING_BITS / limb_bits)
    low = [2 ** (limb_bits - 1)] * (count - 1)
    return low + [2 ** (RING_BITS - 1 - limb_bits * (count - 1))]


def _check_limb_bits(limb_bits: object) -> int:
    if isinstance(limb_bits, bool) or not isinstance(limb_bits, int):
        raise TypeError(f"limb_bits must be an int, got {type(limb_bits).__name__}")
    if not MIN_LIMB_BITS <= limb_bits <= MAX_LIMB_BITS:
        raise ValueError(f"limb_bits must be in [{MIN_LIMB_BITS}, {MAX_LIMB_BITS}], got {limb_bits}")
    return limb_bits


def max_inner_dim(limb_bits: int = DEFAULT_LIMB_BITS) -> int:
    """Longest inner dimension one float64 matmul per shift handles exactly.

    This is floor(2^53 / beta), beta = max_s sum_{i+j=s} bound_i * bound_j.
    """
    bounds = _limb_bounds(_check_limb_bits(limb_bits))
    count = len(bounds)
    beta = max(sum(bounds[i] * bounds[s - i] for i in range(s + 1)) for s in range(count))
    return _FLOAT64_EXACT // beta


def _fill_limbs(x: Tensor, limb_bits: int, outputs: list[Tensor]) -> None:
    """Write the balanced limbs of int64 ``x`` (low limb first) into float64 views ``outputs``.

    Limb i is the low ``limb_bits`` bits of the remainder, sign-extended; the remainder
    then drops them: rem <- (rem - d) >> w.  A wrap in rem - d changes rem by a
    multiple of 2^(64 - w), which vanishes mod 2^64 after the limb is scaled by
    2^(w i), so the identity holds modulo 2^64 for every input.
    """
    rem = x.clone(memory_format=torch.contiguous_format)
    digit = torch.empty_like(rem)
    unused = RING_BITS - limb_bits
    for out in outputs[:-1]:
        torch.bitwise_left_shift(rem, unused, out=digit)
        digit.bitwise_right_shift_(unused)
        out.copy_(digit)
        rem.sub_(digit).bitwise_right_shift_(limb_bits)
    outputs[-1].copy_(rem)


def _ring_mm_chunk(a: Tensor, b: Tensor, limb_bits: int) -> Tensor:
    """a [m, k] @ b [k, n] mod 2^64 for k <= max_inner_dim(limb_bits)."""
    (m, k), n = a.shape, b.shape[1]
    count = math.ceil(RING_BITS / limb_bits)
    # lhs limbs side by side per row: [A_0 | A_1 | ... ]; rhs limbs stacked high limb first.
    limbs_a = torch.empty((m, count, k), dtype=torch.float64)
    _fill_limbs(a, limb_bits, [limbs_a[:, i] for i in range(count)])
    limbs_b = torch.empty((count, k, n), dtype=torch.float64)
    _fill_limbs(b, limb_bits, [limbs_b[count - 1 - i] for i in range(count)])
    flat_a = limbs_a.view(m, count * k)
    flat_b = limbs_b.view(count * k, n)
    used_a = _used_limbs([limbs_a[:, i] for i in range(count)])
    used_b = _used_limbs([limbs_b[count - 1 - j] for j in range(count)])

    result = torch.zeros((m, n), dtype=torch.int64)
    shift_sum = torch.empty((m, n), dtype=torch.float64)
    shift_sum_int = torch.empty((m, n), dtype=torch.int64)
    for shift in reversed(range(count)):
        # [A_lo .. A_hi] @ [B_(s-lo); ..; B_(s-hi)] = sum_{i+j=s} A_i @ B_j, exact in float64;
        # the limbs a small operand (a plaintext one party holds) leaves at 0 are skipped.
        lo, hi = max(0, shift - used_b + 1), min(shift, used_a - 1)
        result.mul_(1 << limb_bits)
        if lo > hi:
            continue
        torch.mm(flat_a[:, lo * k: (hi + 1) * k], flat_b[(count - 1 - shift + lo) * k: (count - shift + hi) * k],
                 out=shift_sum)
        shift_sum_int.copy_(shift_sum)
        result.add_(shift_sum_int)
    return result


def _used_limbs(limbs: list[Tensor]) -> int:
    """How many limbs, low first, are needed: those above the highest non-zero one are all 0
    (a value of magnitude below 2^(w t - 1) has t limbs, e.g. a fixed-point plaintext)."""
    used = len(limbs)
    while used > 1 and not bool(limbs[used - 1].any()):
        used -= 1
    return used


def ring_matmul(a: Tensor, b: Tensor, limb_bits: int = DEFAULT_LIMB_BITS) -> Tensor:
    """Exact ``a @ b`` in Z_2^64 (what int64 ``torch.matmul`` computes), via float64 limbs.

    Args:
        a: int64 tensor [..., k]; leading dimensions are batch dimensions.
        b: int64 matrix [k, n].
        limb_bits: limb width w in [8, 26]; see the module docstring for the trade-off.

    Returns:
        int64 tensor [..., n].
    """
    check_ring_tensor(a, "left matmul operand")
    check_ring_tensor(b, "right matmul operand")
    _check_limb_bits(limb_bits)
    if a.dim() < 2 or b.dim() != 2:
        raise ValueError(
            f"ring_matmul needs a [..., k] (2+ dims) and b [k, n], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    lead, k, n = a.shape[:-1], b.shape[0], b.shape[1]
    flat = a.reshape(math.prod(lead), k)
    chunk = max_inner_dim(limb_bits)
    parts = [_ring_mm_chunk(flat[:, i : i + chunk], b[i : i + chunk], limb_bits) for i in range(0, k, chunk)]
    if not parts:
        return torch.zeros((*lead, n), dtype=torch.int64)
    total = parts[0]
    for part in parts[1:]:
        total.add_(part)
    return total.reshape(*lead, n)
