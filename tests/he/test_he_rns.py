"""The building blocks under the protocol: coefficient encoding on SEAL's CKKS
ciphertexts, the constant-coefficient trick, masks, CSPRNG sampling, fixed point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.he import ClientKeys, decode_fixed, encode_fixed
from flower_split.he import _random, _rns, packing
from flower_split.he.fixed_point import wrap_ints
from flower_split.he.params import NOISE_MAX


@pytest.fixture(scope="module")
def keys() -> ClientKeys:
    return ClientKeys.generate()


def test_ntt_round_trip_and_encryption_keep_integer_coefficients(keys):
    top = keys.public.levels[0]
    rng = np.random.default_rng(0)
    coeffs = rng.integers(-(2**61), 2**61, size=top.degree, dtype=np.int64)
    res = _rns.residues(top, coeffs)
    assert np.array_equal(_rns.from_ntt(top, _rns.to_ntt(top, res)), res)
    # Through SEAL: encrypt the crafted plaintext, decrypt, and read back the integers.
    plain = keys.public.plaintext(top, coeffs, 2.0**62)
    ct = keys.public.load_ciphertext(keys.encrypt_symmetric(plain), top, 2.0**62)
    back = _rns.crt_centered(top, _rns.from_ntt(top, keys.decrypt(ct, top)))
    noise = back - coeffs.astype(object)
    assert max(abs(int(e)) for e in noise) <= NOISE_MAX
    assert any(int(e) != 0 for e in noise)  # fresh encryption noise is really there


def test_constant_coefficient_from_ntt_values(keys):
    level = keys.public.levels[1]
    coeffs = _random.uniform_below(level.modulus, level.degree) - level.modulus // 2
    ntt = _rns.to_ntt(level, _rns.residues(level, coeffs))
    from_coefficients = int(_rns.crt_centered(level, _rns.from_ntt(level, ntt))[0])
    assert _rns.constant_coefficient(level, ntt) == from_coefficients == int(coeffs[0])


def test_random_with_constant_fixes_only_the_constant(keys):
    level = keys.public.levels[0]
    mask = _rns.random_with_constant(level, -123456789)
    coeffs = _rns.crt_centered(level, _rns.from_ntt(level, mask))
    assert int(coeffs[0]) == -123456789
    rest = np.array([float(c) for c in coeffs[1:]]) / level.modulus
    assert abs(rest.mean()) < 0.02 and abs(np.mean(np.abs(rest) > 0.25) - 0.5) < 0.03
    assert not np.array_equal(mask, _rns.random_with_constant(level, -123456789))


def _negacyclic_product(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = x.size
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        for j in range(n):
            k, sign = (i + j, 1) if i + j < n else (i + j - n, -1)
            out[k] += sign * x[i] * y[j]
    return out


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(-50, 50), min_size=16, max_size=16),
    st.lists(st.integers(-50, 50), min_size=16, max_size=16),
)
def test_reverse_negacyclic_puts_the_inner_product_in_coefficient_zero(y, a):
    y, a = np.array(y), np.array(a)
    assert _negacyclic_product(y, packing.reverse_negacyclic(a))[0] == int(y @ a)


def test_pack_is_row_major_and_zero_padded():
    block = np.arange(1, 13).reshape(3, 4)
    runs = packing.pack(block, 5)
    assert [r.tolist() for r in runs] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 0, 0, 0]]


def test_csprng_integers_are_in_range_and_spread():
    small = _random.uniform_below(7, 70000).astype(np.int64)
    assert small.min() == 0 and small.max() == 6
    assert np.all(np.abs(np.bincount(small) / 70000 - 1 / 7) < 0.01)
    big = _random.uniform_below(3 << 100, 2000)
    assert all(0 <= int(v) < 3 << 100 for v in big)
    assert np.mean([int(v) >= 3 << 99 for v in big]) == pytest.approx(0.5, abs=0.05)
    res = _random.uniform_residues(1_000_003, 50000)
    assert res.dtype == np.uint64 and int(res.max()) < 1_000_003 and abs(res.mean() / 1_000_003 - 0.5) < 0.01


@settings(max_examples=50, deadline=None)
@given(g=st.floats(-1.0, 1.0), m=st.floats(-(2.0**30), 2.0**30))
def test_fixed_point_shares_add_up(g, m):
    def f64(x: float) -> torch.Tensor:
        return torch.tensor([x], dtype=torch.float64)

    share = encode_fixed(f64(g - m)) + encode_fixed(f64(m))
    assert abs(int(share[0]) - int(encode_fixed(f64(g))[0])) <= 1
    assert abs(decode_fixed(share)[0].item() - g) <= 2**-16


def test_fixed_point_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="finite"):
        encode_fixed(torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="finite"):
        encode_fixed(torch.tensor([2.0**48]), frac_bits=16)
    with pytest.raises(ValueError, match="int64"):
        decode_fixed(torch.tensor([1.0]))


def test_wrap_ints_reduces_mod_2_64():
    values = np.array([0, -1, 2**63, 2**64 + 5, -(2**65) - 7, 3 * 2**70 + 2**63 - 1], dtype=object)
    assert wrap_ints(values).tolist() == [0, -1, -(2**63), 5, -7, 2**63 - 1]
