"""Exactness of the limb-based ring matmul against int64 torch.matmul."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.mpc.limbs import DEFAULT_LIMB_BITS, max_inner_dim, ring_matmul

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXTREMES = torch.tensor([INT64_MIN, INT64_MAX, 0, -1, 1, 2**62, -(2**62), 2**21, -(2**21), 2**43 + 2**21])


def _ring_values(shape, seed, extreme_fraction):
    """Full-range int64 test data (not masks), mixed with extreme values."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(INT64_MIN, INT64_MAX, shape, generator=generator, dtype=torch.int64)
    pick = torch.rand(shape, generator=generator) < extreme_fraction
    extremes = EXTREMES[torch.randint(len(EXTREMES), shape, generator=generator)]
    return torch.where(pick, extremes, values)


@settings(max_examples=80, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    k=st.integers(0, 40),
    n=st.integers(1, 12),
    limb_bits=st.integers(8, 26),
    seed=st.integers(0, 2**32),
    extreme_fraction=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_ring_matmul_equals_int64_matmul(lead, k, n, limb_bits, seed, extreme_fraction):
    a = _ring_values((*lead, k), seed, extreme_fraction)
    b = _ring_values((k, n), seed + 1, extreme_fraction)
    assert torch.equal(ring_matmul(a, b, limb_bits), torch.matmul(a, b))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 30), k=st.integers(1, 30), n=st.integers(1, 30), seed=st.integers(0, 2**32))
def test_transposed_views_are_exact(m, k, n, seed):
    # Backward passes feed transposed (non-contiguous) views: x^T @ g and g @ W^T.
    x, g, w = _ring_values((k, m), seed, 0.2), _ring_values((k, n), seed + 1, 0.2), _ring_values((m, n), seed + 2, 0.2)
    assert torch.equal(ring_matmul(x.T, g), x.T @ g)
    assert torch.equal(ring_matmul(g, w.T), g @ w.T)


def test_inner_dimension_bounds():
    assert DEFAULT_LIMB_BITS == 22
    assert max_inner_dim(22) == 1024  # beta = 2^43: |d| <= 2^21, top limb |d| <= 2^19
    assert max_inner_dim(16) == 2**21  # beta = 4 * 2^30
    assert max_inner_dim(26) == 4  # tiny: exercises chunking in the property test


@pytest.mark.parametrize("k", [1024, 1025, 3000])
def test_worst_case_limbs_at_and_beyond_the_chunk_bound(k):
    # Every balanced 22-bit limb at its largest magnitude: each shift's partial sum
    # reaches k * 2^43, i.e. exactly 2^53 at k = 1024; beyond that, chunking kicks in.
    worst = (-(2**21) - 2**43 - 2**63) % 2**64
    worst -= 2**64 if worst >= 2**63 else 0
    a = torch.full((3, k), worst, dtype=torch.int64)
    b = torch.full((k, 2), worst, dtype=torch.int64)
    assert torch.equal(ring_matmul(a, b), a @ b)


def test_real_adapter_shapes_are_exact():
    for m, k, n in [(768, 384, 64), (384, 768, 64), (768, 64, 384)]:
        a, b = _ring_values((m, k), m + k, 0.01), _ring_values((k, n), n, 0.01)
        assert torch.equal(ring_matmul(a, b), a @ b)


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        (torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int64), TypeError, "int64"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64), ValueError, "inner"),
        (torch.zeros(3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), ValueError, "2\\+ dims"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(1, 3, 2, dtype=torch.int64), ValueError, "b \\[k, n\\]"),
    ],
)
def test_rejects_bad_operands(a, b, error, match):
    with pytest.raises(error, match=match):
        ring_matmul(a, b)


@pytest.mark.parametrize("limb_bits, error", [(7, ValueError), (27, ValueError), (22.0, TypeError)])
def test_rejects_bad_limb_width(limb_bits, error):
    with pytest.raises(error, match="limb_bits"):
        ring_matmul(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), limb_bits)


@settings(max_examples=80, deadline=None)
@given(
    m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 9), limb_bits=st.integers(8, 26),
    bits_a=st.sampled_from([0, 1, 7, 8, 21, 22, 23, 43, 44, 45, 64]),
    bits_b=st.sampled_from([0, 1, 7, 8, 21, 22, 23, 43, 44, 45, 64]),
    seed=st.integers(0, 2**32),
)
def test_small_operands_skip_zero_limbs_and_stay_exact(m, k, n, limb_bits, bits_a, bits_b, seed):
    """A small operand (a fixed-point plaintext one party holds) has zero high limbs, which
    ``ring_matmul`` skips; the product stays exact at every magnitude around a limb boundary,
    on either side, and when a whole operand is 0."""
    generator = torch.Generator().manual_seed(seed)

    def values(shape, bits):
        if bits == 64:
            return torch.randint(INT64_MIN, INT64_MAX, shape, generator=generator, dtype=torch.int64)
        bound = 1 << max(bits - 1, 0)
        data = torch.randint(-bound, bound + 1, shape, generator=generator, dtype=torch.int64)
        return data if bits else torch.zeros(shape, dtype=torch.int64)

    a, b = values((m, k), bits_a), values((k, n), bits_b)
    assert torch.equal(ring_matmul(a, b, limb_bits), a @ b)
