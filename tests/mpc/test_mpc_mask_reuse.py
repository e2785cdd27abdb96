"""Mask reuse (issue 15): one mask per shared tensor, opened once, reused by every product it enters.

* products that reuse an opening equal plaintext within the fixed-point bound;
* the transcript: a forward + backward run opens exactly the values it masks, once each,
  and the backward after the forward opens 2nd + 2nr + 2rd fewer elements than fresh masks;
* the invariant: a mask never masks two different tensors (the code refuses).
"""

import pytest
import torch

from flower_split.mpc import LocalTwoParty, MaskRecord, MaskReuseError, OnlineMaskDealer, PartyState, Quadratic
from flower_split.mpc import AdditiveShare, Use, View, adapter_backward, adapter_forward, decode, encode, reconstruct, share
from flower_split.mpc.beaver import begin
from flower_split.mpc.stages import Product, Program, Stage
from flower_split.mpc.triples import TripleRequest

ACT = Quadratic(0.5, 0.25, 0.125)
LSB = 2.0**-16


def _states(scope, **values):
    s0, s1 = PartyState(0, scope=scope), PartyState(1, scope=scope)
    for name, value in values.items():
        s0.values[name], s1.values[name] = share(value)
    return s0, s1


def _opened(states, name):
    return reconstruct(states[0].values[name], states[1].values[name])


def _twice() -> Program:
    """g @ W and g^T @ v in one stage, then h @ W in the next: g opened once, W once."""
    return Program("twice", (
        Stage("one", (Product("gW", TripleRequest.matmul((3, 4), (4, 2)), Use("g", (3, 4)), Use("W", (4, 2))),
                      Product("gv", TripleRequest.matmul((4, 3), (3, 5)), Use("g", (3, 4), View.T),
                              Use("v", (3, 5))))),
        Stage("two", (Product("hW", TripleRequest.matmul((3, 4), (4, 2)), Use("h", (3, 4)), Use("W", (4, 2))),)),
    ), inputs=("g", "W", "v", "h"), outputs=("gW", "gv", "hW"))


def test_reused_openings_give_plaintext_products_within_one_lsb():
    gen = torch.Generator().manual_seed(3)
    g, w, v, h = (decode(encode(torch.randn(shape, generator=gen, dtype=torch.float64)))  # on the fixed-point grid
                  for shape in ((3, 4), (4, 2), (3, 5), (3, 4)))
    states = _states("s", g=g, W=w, v=v, h=h)
    parties = LocalTwoParty()
    parties.run(_twice(), *states)
    for name, exact in (("gW", g @ w), ("gv", g.T @ v), ("hW", h @ w)):
        assert (_opened(states, name) - exact).abs().max().item() < LSB, name  # one truncation, no encoding error
    assert parties.bytes_sent == [8 * (12 + 8 + 15 + 12)] * 2  # g, W, v, then h: W is not sent again
    assert set(states[0].masks) == {"g", "W", "v", "h"}


def test_forward_backward_transcript_opens_each_value_once():
    b, t, d, r = 2, 3, 8, 4
    n = b * t
    forward, backward = adapter_forward(b, t, d, r, ACT), adapter_backward(b, t, d, r, ACT)
    fresh = sum(request.opened_elements for request in forward.requests() + backward.requests())
    reused = forward.opened_elements() + backward.opened_elements(forward.uses())
    assert fresh - reused == 2 * n * d + 2 * n * r + 2 * r * d  # x, h, A, B again in backward; gy, gu twice
    gen = torch.Generator().manual_seed(5)
    states = _states("head", x=torch.randn(b, t, d, generator=gen), A=torch.randn(d, r, generator=gen) / 4,
                     B=torch.randn(r, d, generator=gen) / 4)
    parties = LocalTwoParty()
    parties.run(forward, *states)
    for state, gy in zip(states, share(torch.randn(b, t, d, generator=gen))):
        state.values["gy"] = gy
    parties.run(backward, *states)
    assert parties.bytes_sent == [8 * reused] * 2
    assert set(states[0].masks) == {"x", "A", "B", "u", "h", "gy", "gh", "du", "gu"}


def test_a_mask_refuses_a_second_tensor_under_the_same_name():
    b, t, d, r = 1, 2, 4, 2
    states = _states("tail", x=torch.ones(b, t, d), A=torch.ones(d, r) / 4, B=torch.ones(r, d) / 4)
    parties = LocalTwoParty()
    parties.run(adapter_forward(b, t, d, r, ACT), *states)
    for state, (x, gy) in zip(states, zip(share(torch.full((b, t, d), 2.0)), share(torch.ones(b, t, d)))):
        state.values["x"], state.values["gy"] = x, gy  # another x, to be opened with x's mask: refused
    with pytest.raises(MaskReuseError, match="'x' already opened another tensor"):
        parties.run(adapter_backward(b, t, d, r, ACT), *states)
    assert states[0].pending is None


def test_a_dealer_deals_a_scope_mask_once_per_party():
    parties = LocalTwoParty()
    program = adapter_forward(1, 1, 2, 1, ACT)
    parties.run(program, *_states("head", x=torch.ones(1, 1, 2), A=torch.ones(2, 1), B=torch.ones(1, 2)))
    with pytest.raises(MaskReuseError, match="already dealt to party 0"):  # another tensor, same scope and name
        parties.run(program, *_states("head", x=torch.zeros(1, 1, 2), A=torch.ones(2, 1), B=torch.ones(1, 2)))
    dealer = OnlineMaskDealer()
    dealer.mask(1, "s", "x", (2,))
    with pytest.raises(MaskReuseError):
        dealer.mask(1, "s", "x", (2,))


def test_a_mask_record_binds_one_share():
    x0, _ = share(torch.ones(3))
    record = MaskRecord.open(x0, torch.zeros(3, dtype=torch.int64))
    record.check_bound("x", x0)
    other, _ = share(torch.ones(3))
    with pytest.raises(MaskReuseError):
        record.check_bound("x", other)
    done = record.completed(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="already completed"):
        done.completed(torch.zeros(3, dtype=torch.int64))


def test_a_program_refuses_one_name_with_two_shapes():
    with pytest.raises(ValueError, match="used with"):
        Program("bad", (Stage("s", (
            Product("p", TripleRequest.mul((2,)), Use("g", (2,)), Use("g2", (2,))),
            Product("q", TripleRequest.matmul((2, 3), (3, 1)), Use("g", (2, 3)), Use("w", (3, 1))),
        )),), inputs=(), outputs=())


def test_a_program_refuses_one_name_with_two_holders_or_a_product_one_party_holds_whole():
    with pytest.raises(ValueError, match="used with"):
        Program("bad", (Stage("s", (
            Product("p", TripleRequest.mul((2,)), Use("g", (2,), holder=1), Use("g2", (2,))),
            Product("q", TripleRequest.mul((2,)), Use("g", (2,)), Use("w", (2,))),
        )),), inputs=(), outputs=())
    with pytest.raises(ValueError, match="both operands are held by party 0"):
        Program("bad", (Stage("s", (
            Product("p", TripleRequest.mul((2,)), Use("g", (2,), holder=0), Use("w", (2,), holder=0)),
        )),), inputs=(), outputs=())


def test_a_stage_refuses_a_nonzero_share_of_a_value_the_peer_holds_before_drawing_any_mask():
    """Party 1's share of a value party 0 holds must be 0: a nonzero one is refused by ``Stage.begin``
    before any mask is drawn, so the stage can still run once the value is corrected."""
    stage = Stage("s", (Product("p", TripleRequest.mul((2,)), Use("g", (2,), holder=0), Use("w", (2,))),))
    program = Program("one", (stage,), inputs=("g", "w"), outputs=("p",))
    g, w = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    s0, s1 = PartyState(0, scope="m"), PartyState(1, scope="m")
    s0.values["w"], s1.values["w"] = share(w)
    s0.values["g"] = AdditiveShare(encode(g), 0, 16)
    s1.values["g"] = AdditiveShare(torch.ones(2, dtype=torch.int64), 1, 16)
    parties = LocalTwoParty()
    with pytest.raises(ValueError, match="must be 0"):
        stage.begin(s1, parties.sources[1])
    assert not s1.masks and s1.pending is None
    s1.values["g"] = AdditiveShare(torch.zeros(2, dtype=torch.int64), 1, 16)
    parties.run(program, s0, s1)
    assert torch.allclose(_opened((s0, s1), "p").float(), g * w, atol=4 * LSB)


def test_a_pending_product_holds_its_opening_as_a_view_of_the_masks_opening():
    """Stage.begin hands each product the opening its masks made (x - a through the product's
    view), so the party neither subtracts nor stores it again; a wrongly shaped one is refused."""
    states = _states("s", g=torch.randn(3, 4), W=torch.randn(4, 2), v=torch.randn(3, 5), h=torch.randn(3, 4))
    stage = _twice().stages[0]
    sources = OnlineMaskDealer().sources()
    stage.begin(states[0], sources[0])
    masks = states[0].masks
    for product in states[0].pending[1]:
        x, y = product.sent
        assert torch.equal(x, product.x - product.material.a) and torch.equal(y, product.y - product.material.b)
    gv = states[0].pending[1][1]  # g seen through View.T
    assert gv.sent[0].untyped_storage().data_ptr() == masks["g"].sent.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="given opening has shapes"):
        begin(gv.request, AdditiveShare(gv.x, 0), AdditiveShare(gv.y, 0), gv.material, opened=(gv.sent[0],))
