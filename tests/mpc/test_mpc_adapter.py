"""Secure adapter / classifier programs against float64 autograd, and stage mechanics.

Tolerance.  Inputs and weights are drawn on the fixed-point grid (multiples of 2^-16)
and the activation coefficients are exactly representable, so encoding adds no error
and the reference is float64 autograd on the very same numbers.  The only error left
is local truncation: each truncation is off by less than 1 LSB = 2^-16, and an error
already present in an operand is scaled by the other operand of every later product.
The helpers below propagate those bounds through the actual magnitudes (max-abs values
and L1 norms of the operands), giving a rigorous per-output bound; the tests also check
the bound is small (a few hundred LSB at most), so it is not vacuous.
"""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.mpc.layers import (
    Quadratic,
    adapter_backward,
    adapter_forward,
    classifier_backward,
    classifier_forward,
    mean_pool,
    mean_pool_backward,
)
from flower_split.mpc.correlated import OnlineMaskDealer
from flower_split.mpc.local import LocalTwoParty
from flower_split.mpc.ring import decode, encode
from flower_split.mpc.share import AdditiveShare, reconstruct, share
from flower_split.mpc.stages import PartyState

LSB = 2.0**-16
SLACK = 1e-12  # float64 rounding in the reference


def _grid(shape, scale, generator):
    """Uniform values in [-scale, scale] rounded to the fixed-point grid."""
    return decode(encode((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale))


def _states(scope="", **values):
    s0, s1 = PartyState(0, scope=scope), PartyState(1, scope=scope)
    for name, value in values.items():
        s0.values[name], s1.values[name] = share(value)
    return s0, s1


def _held(value, holder):
    """(party 0's, party 1's) shares of ``value`` held by ``holder`` (None: shared at random)."""
    if holder is None:
        return share(value)
    data = encode(value)
    shares = [AdditiveShare(torch.zeros_like(data), p, 16) for p in (0, 1)]
    shares[holder] = AdditiveShare(data, holder, 16)
    return shares[0], shares[1]


def _opened(s0, s1, name):
    return reconstruct(s0.values[name], s1.values[name])


def _col_l1(m):
    return m.abs().sum(0).max().item()


def _row_l1(m):
    return m.abs().sum(1).max().item()


def _adapter_bounds(x, a, b, gy, act, e_x=0.0, e_gy=0.0):
    """Worst-case |secure - exact| of each adapter output, given input errors e_x, e_gy."""
    u = x @ a
    n = u.shape[0] * u.shape[1]
    x2, h2, gy2 = x.reshape(n, -1), act(u).reshape(n, -1), gy.reshape(n, -1)
    gh = gy @ b.T
    du = act.c1 + 2 * act.c2 * u
    gu2 = (gh * du).reshape(n, -1)
    e = {"u": e_x * _col_l1(a) + LSB}
    e["u2"] = (2 * u.abs().max().item() + e["u"]) * e["u"] + LSB
    e["h"] = abs(act.c1) * e["u"] + abs(act.c2) * e["u2"] + LSB
    e["y"] = e_x + e["h"] * _col_l1(b) + LSB
    e["gB"] = e["h"] * _col_l1(gy2) + e_gy * _col_l1(h2) + n * e["h"] * e_gy + LSB
    e["gh"] = e_gy * _row_l1(b) + LSB
    e["du"] = 2 * abs(act.c2) * e["u"] + LSB
    e["gu"] = gh.abs().max().item() * e["du"] + du.abs().max().item() * e["gh"] + e["gh"] * e["du"] + LSB
    e["gA"] = e_x * _col_l1(gu2) + e["gu"] * _col_l1(x2) + n * e_x * e["gu"] + LSB
    e["gx"] = e_gy + e["gu"] * _row_l1(a) + LSB
    return e


def _classifier_bounds(p, wc, gz, e_p=0.0, e_gz=0.0):
    batch = p.shape[0]
    return {
        "z": e_p * _col_l1(wc) + LSB,
        "gWc": e_p * _col_l1(gz) + e_gz * _col_l1(p) + batch * e_p * e_gz + LSB,
        "gbc": batch * e_gz,
        "gp": e_gz * _row_l1(wc) + LSB,
    }


def _assert_within(secure, exact, bound, name):
    error = (secure - exact).abs().max().item()
    assert error <= bound + SLACK, f"{name}: error {error:.3g} exceeds bound {bound:.3g}"
    assert bound < 500 * LSB, f"{name}: bound {bound:.3g} too loose to mean anything"


coefficients = st.sampled_from([0.0, 0.125, -0.25, 0.5, 1.0])


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 4),
    dim=st.integers(1, 12),
    rank=st.integers(1, 6),
    c=st.tuples(coefficients, coefficients, coefficients),
    seed=st.integers(0, 2**31),
    x_holder=st.sampled_from([None, 0, 1]),
    gy_holder=st.sampled_from([None, 0, 1]),
)
def test_adapter_forward_backward_match_autograd(batch, tokens, dim, rank, c, seed, x_holder, gy_holder):
    """Shared or held inputs (the head's e is the client's, its dL/df the cloud's): same bounds."""
    gen = torch.Generator().manual_seed(seed)
    act = Quadratic(*c)
    x, a, b = _grid((batch, tokens, dim), 1.0, gen), _grid((dim, rank), 0.5, gen), _grid((rank, dim), 0.5, gen)
    gy = _grid((batch, tokens, dim), 1.0, gen)
    s0, s1 = _states(A=a, B=b)
    s0.values["x"], s1.values["x"] = _held(x, x_holder)
    parties = LocalTwoParty()
    parties.run(adapter_forward(batch, tokens, dim, rank, act, x_holder=x_holder), s0, s1)
    s0.values["gy"], s1.values["gy"] = _held(gy, gy_holder)
    parties.run(adapter_backward(batch, tokens, dim, rank, act, x_holder=x_holder, gy_holder=gy_holder), s0, s1)
    assert parties.rounds == 6
    n, shared = batch * tokens * dim, 2 * dim * rank + 5 * batch * tokens * rank  # A, B; u, h, gh, du, gu
    for party in (0, 1):  # a party sends the openings of what it holds or shares, never of what the peer holds
        sent = shared + n * ((x_holder in (None, party)) + (gy_holder in (None, party)))
        assert parties.bytes_sent[party] == 8 * sent

    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
    y = xr + act(xr @ ar) @ br
    y.backward(gy)
    bounds = _adapter_bounds(x, a, b, gy, act)
    for name, exact in [("y", y.detach()), ("gx", xr.grad), ("gA", ar.grad), ("gB", br.grad)]:
        _assert_within(_opened(s0, s1, name), exact, bounds[name], name)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), dim=st.integers(1, 16), classes=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_classifier_forward_backward_match_autograd(batch, dim, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    p, wc = _grid((batch, dim), 1.0, gen), _grid((dim, classes), 0.5, gen)
    bc, gz = _grid((classes,), 0.5, gen), _grid((batch, classes), 1.0, gen)
    s0, s1 = _states(p=p, Wc=wc, bc=bc)
    parties = LocalTwoParty()
    parties.run(classifier_forward(batch, dim, classes), s0, s1)
    s0.values["gz"], s1.values["gz"] = share(gz)
    parties.run(classifier_backward(batch, dim, classes), s0, s1)
    assert parties.rounds == 2

    pr, wr, br = (t.clone().requires_grad_() for t in (p, wc, bc))
    z = pr @ wr + br
    z.backward(gz)
    bounds = _classifier_bounds(p, wc, gz)
    for name, exact in [("z", z.detach()), ("gWc", wr.grad), ("gbc", br.grad), ("gp", pr.grad)]:
        _assert_within(_opened(s0, s1, name), exact, bounds[name], name)


def test_tail_adapter_pool_classifier_end_to_end():
    """Adapter -> masked mean pool -> classifier, forward and backward, vs autograd."""
    gen = torch.Generator().manual_seed(7)
    batch, tokens, dim, rank, classes = 4, 6, 16, 4, 5
    act = Quadratic(0.5, 0.25, 0.125)
    x, a, b = _grid((batch, tokens, dim), 1.0, gen), _grid((dim, rank), 0.5, gen), _grid((rank, dim), 0.5, gen)
    wc, bc = _grid((dim, classes), 0.5, gen), _grid((classes,), 0.5, gen)
    mask = torch.ones(batch, tokens, dtype=torch.int64)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    # Reference, with dL/dz = g fixed on the grid (what the loss step would hand back).
    xr, ar, br, wr, bcr = (t.clone().requires_grad_() for t in (x, a, b, wc, bc))
    y = xr + act(xr @ ar) @ br
    y.retain_grad()
    pooled = (y * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    z = pooled @ wr + bcr
    g = decode(encode(torch.softmax(z.detach(), -1) - torch.eye(classes, dtype=torch.float64)[[0, 2, 4, 1]]))
    (z * g).sum().backward()

    parties = LocalTwoParty()
    adapter = _states(scope="tail", x=x, A=a, B=b)
    parties.run(adapter_forward(batch, tokens, dim, rank, act), *adapter)
    classifier = _states(scope="cls", Wc=wc, bc=bc)
    for state, adapter_state in zip(classifier, adapter):
        state.values["p"] = mean_pool(adapter_state.values["y"], mask)
    parties.run(classifier_forward(batch, dim, classes), *classifier)
    classifier[0].values["gz"], classifier[1].values["gz"] = share(g)
    parties.run(classifier_backward(batch, dim, classes), *classifier)
    for state, adapter_state in zip(classifier, adapter):
        adapter_state.values["gy"] = mean_pool_backward(state.values["gp"], mask)
    parties.run(adapter_backward(batch, tokens, dim, rank, act), *adapter)
    assert parties.rounds == 3 + 1 + 1 + 3

    # Chain the bounds: pooling and its backward each add < 1 LSB.
    e_p = _adapter_bounds(x, a, b, y.grad, act)["y"] + LSB
    classifier_bounds = _classifier_bounds(pooled.detach(), wc, g, e_p=e_p)
    adapter_bounds = _adapter_bounds(x, a, b, y.grad, act, e_gy=classifier_bounds["gp"] + LSB)
    for name, exact in [("z", z.detach()), ("gWc", wr.grad), ("gbc", bcr.grad)]:
        _assert_within(_opened(*classifier, name), exact, classifier_bounds[name], name)
    for name, exact in [("gx", xr.grad), ("gA", ar.grad), ("gB", br.grad)]:
        _assert_within(_opened(*adapter, name), exact, adapter_bounds[name], name)


# -------------------------------------------------------------- stage mechanics
ACT = Quadratic(0.5, 0.25, 0.125)


def test_program_metadata_and_costs():
    forward = adapter_forward(32, 24, 384, 64, ACT)
    backward = adapter_backward(32, 24, 384, 64, ACT)
    head_backward = adapter_backward(32, 24, 384, 64, ACT, input_grad=False)
    assert (forward.rounds, backward.rounds, head_backward.rounds) == (3, 3, 3)
    n = 32 * 24
    assert forward.opened_elements() == (n * 384 + 384 * 64) + n * 64 + (n * 64 + 64 * 384)
    # Alone, the backward opens gy, B, h, gh, du, x, gu (and A with the input gradient) once each;
    # after the forward of the same scope, x, A, B and h are reused: gy, gh, du and gu remain.
    assert backward.opened_elements() - head_backward.opened_elements() == 384 * 64
    assert backward.opened_elements(forward.uses()) == head_backward.opened_elements(forward.uses())
    assert backward.opened_elements(forward.uses()) == n * 384 + 3 * n * 64
    assert head_backward.outputs == ("gA", "gB") and "gx" in backward.outputs
    assert classifier_forward(32, 384, 77).rounds == classifier_backward(32, 384, 77).rounds == 1


def test_material_covers_a_run_exactly():
    program = adapter_forward(2, 3, 4, 2, ACT)
    dealer = OnlineMaskDealer()
    sources = dealer.sources()
    for run in range(2):
        s0, s1 = _states(scope=f"run{run}", x=torch.ones(2, 3, 4), A=torch.ones(4, 2), B=torch.ones(2, 4))
        for stage in program.stages:
            sent0, sent1 = stage.begin(s0, sources[0]), stage.begin(s1, sources[1])
            stage.finish(s0, sent1)
            stage.finish(s1, sent0)
        assert set(s0.masks) == set(program.uses()) == {"x", "A", "B", "u", "h"}
    assert len(dealer._pending[0]) == len(dealer._pending[1]) == 0


def _first_stage_begun():
    program = classifier_forward(2, 3, 4)
    s0, s1 = _states(p=torch.ones(2, 3), Wc=torch.ones(3, 4), bc=torch.ones(4))
    q0, q1 = OnlineMaskDealer().sources()
    stage = program.stages[0]
    return stage, (s0, s1), (q0, q1), (stage.begin(s0, q0), stage.begin(s1, q1))


def test_malformed_opening_leaves_state_unchanged_and_retry_succeeds():
    stage, (s0, s1), _, (sent0, sent1) = _first_stage_begun()
    before = dict(s0.values)
    bad = [sent1[0][:1], sent1[1]]
    with pytest.raises(ValueError, match="shape"):
        stage.finish(s0, bad)
    with pytest.raises(ValueError, match="expects 2 openings"):
        stage.finish(s0, sent1 * 2)
    assert s0.values == before and s0.pending is not None
    assert all(record.received is None for record in s0.masks.values())
    stage.finish(s0, sent1)
    stage.finish(s1, sent0)
    assert torch.allclose(_opened(s0, s1, "z"), torch.full((2, 4), 4.0, dtype=torch.float64))


def test_party_state_survives_serialization_between_messages():
    # In deployment each message runs in a fresh process: the pending stage is persisted.
    stage, (s0, s1), _, (sent0, sent1) = _first_stage_begun()
    restored = pickle.loads(pickle.dumps(s0))
    stage.finish(restored, sent1)
    stage.finish(s1, sent0)
    assert torch.equal(_opened(restored, s1, "z"), torch.full((2, 4), 4.0, dtype=torch.float64))


def test_out_of_order_stage_calls_are_rejected():
    stage, (s0, _), (q0, q1), (_, sent1) = _first_stage_begun()
    with pytest.raises(ValueError, match="awaits openings"):
        stage.begin(s0, q0)
    other = adapter_forward(1, 1, 3, 2, ACT).stages[0]
    with pytest.raises(ValueError, match="pending stage is 'classifier.logits'"):
        other.finish(s0, sent1)
    fresh = PartyState(0)
    with pytest.raises(ValueError, match="pending stage is None"):
        stage.finish(fresh, sent1)
    with pytest.raises(ValueError, match="material source"):
        stage.begin(PartyState(1), q0)


def test_missing_or_misshapen_inputs_are_rejected_before_anything_is_consumed():
    program = adapter_forward(2, 3, 4, 2, ACT)
    q0, _ = OnlineMaskDealer().sources()
    s0, _ = _states(x=torch.ones(2, 3, 4), A=torch.ones(4, 2))
    with pytest.raises(ValueError, match="no value named 'A'"):
        program.stages[0].begin(PartyState(0, {"x": s0.values["x"]}), q0)
    s0.values["A"] = share(torch.ones(4, 3))[0]
    with pytest.raises(ValueError, match="operand 'A' has shape"):
        program.stages[0].begin(s0, q0)
    s0.values["A"] = share(torch.ones(4, 2))[1]
    with pytest.raises(ValueError, match="share of party 1"):
        program.stages[0].begin(s0, q0)
    assert s0.pending is None and not s0.masks


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: adapter_forward(0, 1, 1, 1, ACT), "batch"),
        (lambda: adapter_backward(1, 1, 1, True, ACT), "rank"),
        (lambda: classifier_forward(1, -1, 1), "dim"),
        (lambda: PartyState(2), "party"),
        (lambda: mean_pool(share(torch.ones(2, 3, 4))[0], torch.zeros(2, 3, dtype=torch.int64)), "at least one"),
        (lambda: mean_pool(share(torch.ones(2, 3, 4))[0], torch.ones(2, 4, dtype=torch.int64)), "shape"),
        (lambda: mean_pool(share(torch.ones(2, 3, 4))[0], torch.ones(2, 3)), "integer or bool"),
        (lambda: mean_pool(share(torch.ones(2, 3, 4))[0], torch.full((2, 3), 2)), "0 and 1"),
        (lambda: mean_pool(share(torch.ones(2, 3))[0], torch.ones(2, 3, dtype=torch.int64)), "batch, tokens, dim"),
        (lambda: mean_pool_backward(share(torch.ones(2, 3, 4))[0], torch.ones(2, 3, dtype=torch.int64)), "batch, dim"),
    ],
)
def test_validation(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_mean_pool_matches_plaintext_within_one_lsb():
    y = _grid((3, 5, 4), 2.0, torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y0, y1 = share(y)
    exact = (y * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    assert (reconstruct(mean_pool(y0, mask), mean_pool(y1, mask)) - exact).abs().max() < LSB
    gp = _grid((3, 4), 2.0, torch.Generator().manual_seed(2))
    g0, g1 = share(gp)
    expected = gp.unsqueeze(1) * mask.unsqueeze(-1) / mask.sum(1).view(-1, 1, 1)
    assert (reconstruct(mean_pool_backward(g0, mask), mean_pool_backward(g1, mask)) - expected).abs().max() < LSB
