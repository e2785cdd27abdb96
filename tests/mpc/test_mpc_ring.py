"""Ring Z_2^64 in int64 tensors and fixed-point encoding."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.mpc.ring import DEFAULT_FRAC_BITS, decode, encode, max_abs_value

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def test_int64_arithmetic_wraps_modulo_2_64():
    # The whole package relies on torch's int64 ops being ring ops mod 2^64.
    top = torch.tensor([INT64_MAX])
    assert torch.equal(top + 1, torch.tensor([INT64_MIN]))
    assert torch.equal(torch.tensor([2**62]) * 4, torch.tensor([0]))
    assert torch.equal(-torch.tensor([INT64_MIN]), torch.tensor([INT64_MIN]))
    a, b = 0x1234_5678_9ABC_DEF1, 0x0FED_CBA9_8765_4321
    expected = (a * b) % 2**64
    expected -= 2**64 if expected >= 2**63 else 0
    assert (torch.tensor([a]) * torch.tensor([b])).item() == expected


@settings(max_examples=60, deadline=None)
@given(
    frac_bits=st.integers(0, 40),
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20),
)
def test_encode_decode_error_at_most_half_lsb(frac_bits, values):
    x = torch.tensor(values, dtype=torch.float64)
    assert encode(x, frac_bits).dtype == torch.int64
    error = (decode(encode(x, frac_bits), frac_bits) - x).abs().max().item()
    assert error <= 2.0 ** -(frac_bits + 1) * (1 + 1e-9)


@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=10))
def test_integers_encode_exactly(values):
    ring = encode(torch.tensor(values), DEFAULT_FRAC_BITS)
    assert ring.tolist() == [v * 2**DEFAULT_FRAC_BITS for v in values]
    assert decode(ring).tolist() == [float(v) for v in values]


def test_default_range_and_resolution():
    assert DEFAULT_FRAC_BITS == 16
    assert max_abs_value() == 2.0**47
    assert decode(encode(1.5)).item() == 1.5
    assert encode(2.0**-16).item() == 1
    assert encode(-(2.0**-16)).item() == -1
    assert encode(2.0**47 - 1).item() == (2**47 - 1) * 2**16


@pytest.mark.parametrize("bad", [2.0**47, -(2.0**47), 1e300, float("inf"), float("nan")])
def test_encode_rejects_out_of_range_and_non_finite(bad):
    with pytest.raises(ValueError):
        encode(torch.tensor([0.0, bad]))


def test_encode_rejects_out_of_range_integers():
    with pytest.raises(ValueError, match="range"):
        encode(torch.tensor([2**47]))
    with pytest.raises(ValueError, match="range"):
        encode(torch.tensor([INT64_MIN]), 0)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (63, ValueError), (16.0, TypeError), (True, TypeError)])
def test_frac_bits_validation(bad, error):
    with pytest.raises(error, match="frac_bits"):
        encode(torch.zeros(2), bad)


def test_decode_requires_int64():
    with pytest.raises(TypeError, match="int64"):
        decode(torch.zeros(2, dtype=torch.int32))


def test_decode_exact_up_to_2_53():
    ring = torch.tensor([2**53, -(2**53), 12345])
    assert decode(ring, 0).tolist() == [float(2**53), -float(2**53), 12345.0]
    assert math.isclose(decode(torch.tensor([INT64_MAX]), 16).item(), 2.0**47)
