"""Beaver products split into begin/finish: results, error bounds, and validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.mpc.beaver import begin, begin_matmul, begin_mul, begin_square
from flower_split.mpc.dealer import TrustedDealer
from flower_split.mpc.local import LocalTwoParty
from flower_split.mpc.ring import encode
from flower_split.mpc.share import AdditiveShare, reconstruct_ring, share, share_ring
from flower_split.mpc.triples import SquarePair, Triple, TripleRequest


def _ring_data(shape, seed, bound=2**16):
    """Fixed-point test inputs (16 frac bits) with |value| <= bound / 2^16 (default 1).

    Local truncation fails with probability ~|product| * 2^-32 per element (f = 16);
    small values keep the chance that this file ever sees a failure below 1e-5.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-bound, bound, shape, generator=generator, dtype=torch.int64)


def _assert_truncated_product(result_ring, exact_ring):
    """The protocol returns floor(exact / 2^16) or that plus one: error < 1 LSB."""
    floor = torch.div(exact_ring, 2**16, rounding_mode="floor")
    assert bool(((result_ring == floor) | (result_ring == floor + 1)).all())


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31))
def test_mul_and_square_within_one_lsb(shape, seed):
    x, y = _ring_data(shape, seed), _ring_data(shape, seed + 1)
    parties = LocalTwoParty()
    xs, ys = share_ring(x), share_ring(y)
    _assert_truncated_product(reconstruct_ring(*parties.mul(xs, ys)), x * y)
    _assert_truncated_product(reconstruct_ring(*parties.square(xs)), x * x)
    assert parties.rounds == 2


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),
    k=st.integers(1, 12),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31),
)
def test_matmul_and_backward_forms_within_one_lsb(lead, k, n, seed):
    """x [..., k] @ W [k, n], x^T @ g summed over leading dims, and g @ W^T."""
    x, w, g = _ring_data((*lead, k), seed), _ring_data((k, n), seed + 1), _ring_data((*lead, n), seed + 2)
    parties = LocalTwoParty()
    xs, ws, gs = share_ring(x), share_ring(w), share_ring(g)
    _assert_truncated_product(reconstruct_ring(*parties.matmul(xs, ws)), x @ w)

    flat = lambda pair: tuple(s.flatten(0, -2) for s in pair)  # noqa: E731
    x_t = tuple(s.T for s in flat(xs))
    _assert_truncated_product(reconstruct_ring(*parties.matmul(x_t, flat(gs))), x.flatten(0, -2).T @ g.flatten(0, -2))
    w_t = tuple(s.T for s in ws)
    _assert_truncated_product(reconstruct_ring(*parties.matmul(gs, w_t)), g @ w.T)


def test_matmul_at_real_adapter_shape():
    x, w = _ring_data((32, 24, 384), 1, 2**15), _ring_data((384, 64), 2, 2**15)
    parties = LocalTwoParty()
    _assert_truncated_product(reconstruct_ring(*parties.matmul(share_ring(x), share_ring(w))), x @ w)
    assert parties.bytes_sent == [8 * (32 * 24 * 384 + 384 * 64)] * 2


def test_mixed_fractional_bits_keep_the_larger():
    # An integer-valued share (0 frac bits) times a fixed-point share needs no truncation.
    counts = torch.tensor([3, -2, 7])
    x = encode(torch.tensor([0.5, 1.25, -2.0]))
    c0, c1 = share_ring(counts, 0)
    x0, x1 = share_ring(x)
    z = LocalTwoParty().mul((c0, c1), (x0, x1))
    assert z[0].frac_bits == 16
    assert torch.equal(reconstruct_ring(*z), counts * x)


def _started(kind="mul"):
    dealer = TrustedDealer()
    (x0, x1), (y0, y1) = share(torch.ones(2, 3)), share(torch.ones(2, 3))
    if kind == "square":
        m0, m1 = dealer.square_pair((2, 3))
        return begin_square(x0, m0.expand()), begin_square(x1, m1.expand())
    m0, m1 = dealer.mul_triple((2, 3))
    return begin_mul(x0, y0, m0.expand()), begin_mul(x1, y1, m1.expand())


def test_openings_have_the_documented_size():
    (p0, open0), _ = _started("mul")
    (q0, open_sq), _ = _started("square")
    assert len(open0) == 2 and len(open_sq) == 1
    assert p0.request.opened_elements == 12 and q0.request.opened_elements == 6


def test_finish_rejects_malformed_openings():
    (pending, mine), _ = _started("mul")
    with pytest.raises(ValueError, match="2 tensor"):
        pending.finish(mine[:1])
    with pytest.raises(TypeError, match="int64"):
        pending.finish((mine[0].double(), mine[1]))
    with pytest.raises(ValueError, match="shape"):
        pending.finish((mine[0], mine[1][:1]))
    with pytest.raises(ValueError, match="tensor"):
        pending.finish(mine[0])


def test_begin_rejects_mismatched_operands_and_material():
    dealer = TrustedDealer()
    (x0, x1), (y0, _) = share(torch.ones(2, 3)), share(torch.ones(3, 4))
    mul0, _ = dealer.mul_triple((2, 3))
    mm0, _ = dealer.matmul_triple((2, 3), (3, 4))
    sq0, _ = dealer.square_pair((2, 3))
    with pytest.raises(ValueError, match="different parties"):
        begin_mul(x0, x1, mul0.expand())
    with pytest.raises(ValueError, match="operand y has shape"):
        begin_mul(x0, y0, mul0.expand())
    with pytest.raises(ValueError, match="triple.b has shape"):
        begin_matmul(x0, y0, Triple(mm0.expand().a, torch.zeros(4, 3, dtype=torch.int64), mm0.expand().c))
    with pytest.raises(ValueError, match="SquarePair"):
        begin_mul(x0, x0, sq0.expand())
    with pytest.raises(ValueError, match="Triple"):
        begin_square(x0, mul0.expand())
    with pytest.raises(TypeError, match="Triple or SquarePair"):
        begin_square(x0, (1, 2))
    with pytest.raises(TypeError, match="AdditiveShare"):
        begin_mul(x0, torch.ones(2, 3), mul0.expand())
    with pytest.raises(ValueError, match="matmul needs"):
        begin_matmul(x0, x0, mm0.expand())
    with pytest.raises(ValueError, match="one operand"):
        begin(TripleRequest.square((2, 3)), x0, x0, sq0.expand())
    with pytest.raises(TypeError, match="int64"):
        SquarePair(torch.zeros(2, 3), torch.zeros(2, 3)).check(TripleRequest.square((2, 3)))


def test_pending_state_is_plain_data():
    (pending, _), _ = _started("mul")
    assert isinstance(pending.x, torch.Tensor) and isinstance(pending.party, int)
    assert isinstance(AdditiveShare(pending.x, pending.party), AdditiveShare)


@pytest.mark.parametrize("holder", [0, 1])
@pytest.mark.parametrize("held", ["x", "y"])
def test_a_product_with_a_held_operand_is_exact_and_refuses_a_nonzero_share_of_it(holder, held):
    """beaver's held forms (module docstring): one party holds x (or y) in the clear, the other's
    share of it and of its mask are 0, c = op(a, b_N) (or op(a_N, b)); the result is the product
    within 1 LSB. A non-holder whose share of the held operand is not 0 is refused at ``begin``."""
    from flower_split.mpc.correlated import product_c
    from flower_split.mpc.masks import Use
    from flower_split.mpc.randomness import random_ring

    x, w = _ring_data((3, 5), 11), _ring_data((5, 4), 12)
    request = TripleRequest.matmul((3, 5), (5, 4))
    xu = Use("x", (3, 5), holder=holder if held == "x" else None)
    wu = Use("w", (5, 4), holder=holder if held == "y" else None)
    masks = {}
    for use in (xu, wu):
        shares = [random_ring(use.shape), random_ring(use.shape)]
        if use.holder is not None:
            shares[1 - use.holder] = torch.zeros(use.shape, dtype=torch.int64)
        masks[use.name] = tuple(shares)
    c = product_c(request, xu, wu, masks)
    c0 = random_ring(c.shape)
    c_shares = (c0, c - c0)

    splits = {}
    for name, value, use in (("x", x, xu), ("w", w, wu)):
        if use.holder is None:
            r = random_ring(value.shape)
            splits[name] = (AdditiveShare(r, 0, 16), AdditiveShare(value - r, 1, 16))
        else:
            splits[name] = tuple(AdditiveShare(value if p == use.holder else torch.zeros_like(value), p, 16)
                                 for p in (0, 1))
    kwargs = {"x_holder": xu.holder, "y_holder": wu.holder}
    pending, sent = zip(*(begin(request, splits["x"][p], splits["w"][p],
                                Triple(masks["x"][p], masks["w"][p], c_shares[p]), **kwargs) for p in (0, 1)))
    z0, z1 = pending[0].finish(sent[1]), pending[1].finish(sent[0])
    _assert_truncated_product(reconstruct_ring(z0, z1), x @ w)

    other = 1 - holder
    bad = dict(splits)
    name = "x" if held == "x" else "w"
    bad[name] = tuple(AdditiveShare(torch.ones_like(s.data), s.party, 16) if s.party == other else s
                      for s in splits[name])
    with pytest.raises(ValueError, match="must be 0"):
        begin(request, bad["x"][other], bad["w"][other],
              Triple(masks["x"][other], masks["w"][other], c_shares[other]), **kwargs)
