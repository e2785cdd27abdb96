"""AdditiveShare: splitting, local operations, truncation, and input validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.mpc.ring import decode, encode
from flower_split.mpc.share import AdditiveShare, reconstruct, reconstruct_ring, share, share_ring

LSB = 2.0**-16
values = st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=16)
# Inputs of truncating operations stay small: local truncation fails with probability
# ~|x| / 2^64 for the ring integer x, and tests must not flake.
small_values = st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=16)


def _quantized(xs):
    return decode(encode(torch.tensor(xs, dtype=torch.float64)))


@given(values)
def test_share_reconstruct_round_trip_is_exact_on_the_grid(xs):
    x = _quantized(xs)
    s0, s1 = share(x)
    assert (s0.party, s1.party, s0.frac_bits) == (0, 1, 16)
    assert torch.equal(reconstruct(s0, s1), x)
    assert torch.equal(reconstruct_ring(s0, s1), encode(x))


def test_shares_do_not_depend_on_torch_global_seed():
    x = torch.ones(8)
    torch.manual_seed(0)
    first, _ = share(x)
    torch.manual_seed(0)
    second, _ = share(x)
    assert not torch.equal(first.data, second.data)


@settings(max_examples=50)
@given(values, values, st.floats(-100, 100, allow_nan=False))
def test_local_linear_operations_are_exact(xs, ys, c):
    size = min(len(xs), len(ys))
    x, y = _quantized(xs[:size]), _quantized(ys[:size])
    c = decode(encode(c)).item()
    (x0, x1), (y0, y1) = share(x), share(y)
    assert torch.equal(reconstruct(x0 + y0, x1 + y1), x + y)
    assert torch.equal(reconstruct(x0 - y0, x1 - y1), x - y)
    assert torch.equal(reconstruct(-x0, -x1), -x)
    assert torch.equal(reconstruct(x0 + c, x1 + c), x + c)
    assert torch.equal(reconstruct(c + x0, c + x1), x + c)
    assert torch.equal(reconstruct(x0 - c, x1 - c), x - c)
    assert torch.equal(reconstruct(c - x0, c - x1), c - x)
    assert torch.equal(reconstruct(x0 * 3, x1 * 3), 3 * x)
    assert torch.equal(reconstruct(x0 * torch.tensor(-2), x1 * torch.tensor(-2)), -2 * x)


@settings(max_examples=50)
@given(small_values, st.floats(-10, 10, allow_nan=False))
def test_multiply_by_public_real_within_documented_error(xs, c):
    x = _quantized(xs)
    x0, x1 = share(x)
    # Encoding c costs |x| * LSB/2; truncation costs < 1 LSB.
    bound = x.abs() * LSB / 2 + LSB
    assert ((reconstruct(x0 * c, x1 * c) - x * c).abs() <= bound).all()


@settings(max_examples=80)
@given(
    ring=st.lists(st.integers(-(2**32), 2**32), min_size=1, max_size=32),
    bits=st.integers(1, 16),
)
def test_truncation_is_floor_or_floor_plus_one(ring, bits):
    secret = torch.tensor(ring, dtype=torch.int64)
    s0, s1 = share_ring(secret, 16)
    result = reconstruct_ring(s0.truncate(bits), s1.truncate(bits))
    floor = torch.div(secret, 2**bits, rounding_mode="floor")
    assert s0.truncate(bits).frac_bits == 16 - bits
    assert bool(((result == floor) | (result == floor + 1)).all())


@pytest.mark.parametrize("magnitude, expected_rate", [(2**62, 0.25), (-(2**62), 0.25), (2**61, 0.125)])
def test_truncation_failure_rate_matches_documented_probability(magnitude, expected_rate):
    # Failure probability is (|x| + O(1)) / 2^64 for the shared ring integer x.
    n = 20_000
    secret = torch.full((n,), magnitude, dtype=torch.int64)
    s0, s1 = share_ring(secret)
    result = reconstruct_ring(s0.truncate(16), s1.truncate(16))
    correct = (result - (magnitude >> 16)).abs() <= 1
    failures = (~correct).sum().item()
    sd = (n * expected_rate * (1 - expected_rate)) ** 0.5
    assert abs(failures - n * expected_rate) < 6 * sd


def test_truncation_of_unit_scale_products_is_within_one_lsb():
    # |v| <= 1 for a 2f-bit product: failure probability <= 2^-32 per element.
    secret = encode(torch.linspace(-1, 1, 100_000), 32)
    s0, s1 = share_ring(secret, 32)
    result = reconstruct(s0.truncate(16), s1.truncate(16))
    assert (result - decode(secret, 32)).abs().max().item() < LSB


@settings(max_examples=40)
@given(values, st.integers(1, 1000))
def test_div_public_within_one_lsb(xs, divisor):
    x = _quantized(xs)
    x0, x1 = share(x)
    assert ((reconstruct(x0.div_public(divisor), x1.div_public(divisor)) - x / divisor).abs() < LSB).all()


def test_div_public_by_tensor_broadcasts():
    x = torch.arange(12.0).reshape(3, 4)
    x0, x1 = share(x)
    counts = torch.tensor([[1], [2], [3]])
    assert ((reconstruct(x0.div_public(counts), x1.div_public(counts)) - x / counts).abs() < LSB).all()


def test_shape_operations_commute_with_reconstruction():
    x = _quantized(torch.randn(2, 3, 4).tolist())
    x0, x1 = share(x)
    assert torch.equal(reconstruct(x0.reshape(6, 4), x1.reshape(6, 4)), x.reshape(6, 4))
    assert torch.equal(reconstruct(x0.flatten(0, 1).T, x1.flatten(0, 1).T), x.flatten(0, 1).T)
    assert torch.equal(reconstruct(x0.transpose(1, 2), x1.transpose(1, 2)), x.transpose(1, 2))
    assert torch.equal(reconstruct(x0.sum(1), x1.sum(1)), x.sum(1))
    assert torch.equal(reconstruct(x0[:, 0], x1[:, 0]), x[:, 0])
    assert torch.equal(reconstruct(x0.unsqueeze(0), x1.unsqueeze(0)), x.unsqueeze(0))
    assert x0.shape == (2, 3, 4) and x0.dim() == 3


def test_public_add_broadcasts_identically_for_both_parties():
    x0, x1 = share(torch.zeros(3, 1))
    bias = torch.tensor([1.0, 2.0])
    y0, y1 = x0 + bias, x1 + bias
    assert y0.shape == y1.shape == (3, 2)
    assert torch.equal(reconstruct(y0, y1), torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64))


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "data, party, frac_bits, error, match",
    [
        (torch.zeros(2), 0, 16, TypeError, "int64"),
        (torch.zeros(2, dtype=torch.int32), 0, 16, TypeError, "int64"),
        ([1, 2], 0, 16, TypeError, "torch.Tensor"),
        (torch.zeros(2, dtype=torch.int64), 2, 16, ValueError, "party"),
        (torch.zeros(2, dtype=torch.int64), True, 16, TypeError, "party"),
        (torch.zeros(2, dtype=torch.int64), "0", 16, TypeError, "party"),
        (torch.zeros(2, dtype=torch.int64), 0, -1, ValueError, "frac_bits"),
        (torch.zeros(2, dtype=torch.int64), 0, 63, ValueError, "frac_bits"),
        (torch.zeros(2, dtype=torch.int64), 0, 16.0, TypeError, "frac_bits"),
    ],
)
def test_constructor_rejects_bad_arguments(data, party, frac_bits, error, match):
    with pytest.raises(error, match=match):
        AdditiveShare(data, party, frac_bits)


def test_combining_mismatched_shares_is_rejected():
    x0, x1 = share(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="party 0 and party 1"):
        x0 + x1
    with pytest.raises(ValueError, match="fractional bits"):
        x0 + AdditiveShare(x0.data, 0, 8)
    with pytest.raises(ValueError, match="shapes"):
        x0 - share(torch.zeros(4, 5))[0]
    with pytest.raises(ValueError, match="public value of shape"):
        x0 + torch.zeros(4)
    with pytest.raises(TypeError, match="Beaver"):
        x0 * x0
    with pytest.raises(TypeError, match="str"):
        x0 + "1"
    with pytest.raises(ValueError, match="truncate"):
        x0.truncate(17)
    with pytest.raises(ValueError, match="positive"):
        x0.div_public(0)
    with pytest.raises(TypeError, match="divisor"):
        x0.div_public(2.5)
    with pytest.raises(ValueError, match="0 fractional bits"):
        AdditiveShare(x0.data, 0, 0) * 0.5
    with pytest.raises(ValueError, match="2-D"):
        share(torch.zeros(2, 3, 4))[0].T


def test_reconstruct_rejects_mismatched_pairs():
    x0, x1 = share(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="argument 0 belongs to party 1"):
        reconstruct(x1, x0)
    with pytest.raises(ValueError, match="shapes"):
        reconstruct(x0, share(torch.zeros(3, 2))[1])
    with pytest.raises(ValueError, match="fractional bits"):
        reconstruct(x0, AdditiveShare(x1.data, 1, 8))
    with pytest.raises(TypeError, match="AdditiveShare"):
        reconstruct(x0, x1.data)
    with pytest.raises(TypeError, match="int64"):
        share_ring(torch.zeros(2))


@pytest.mark.parametrize("party", [0, 1])
@pytest.mark.parametrize("bits", [1, 16, 32, 62])
def test_truncate_is_the_secureml_local_division_bit_for_bit(party, bits):
    """``truncate`` shifts instead of dividing; on uniform shares and the ring's edge values
    (-2^63, whose negation wraps to itself, 2^63 - 1, -1, 0, 1) it equals party 0's floor(x / 2^b)
    and party 1's -floor(-x / 2^b)."""
    data = torch.cat([torch.randint(-2**63, 2**63 - 1, (4096,), dtype=torch.int64),
                      torch.tensor([-2**63, 2**63 - 1, -1, 0, 1], dtype=torch.int64)])
    divisor = 1 << bits
    expected = (torch.div(data, divisor, rounding_mode="floor") if party == 0
                else -torch.div(-data, divisor, rounding_mode="floor"))
    assert torch.equal(AdditiveShare(data, party, 62).truncate(bits).data, expected)
