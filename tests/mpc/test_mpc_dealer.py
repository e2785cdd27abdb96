"""Trusted dealer: correctness of dealt material, seed compression, offline queues."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.mpc.dealer import Dealer, MaterialQueue, SeededMaterial, TrustedDealer
from flower_split.mpc.limbs import ring_matmul
from flower_split.mpc.randomness import new_seed
from flower_split.mpc.triples import Op, SquarePair, Triple, TripleRequest

REQUESTS = [
    TripleRequest.mul((3, 4)),
    TripleRequest.matmul((2, 3, 5), (5, 4)),
    TripleRequest.square((7,)),
    TripleRequest.matmul((5, 6), (6, 2)),
]


def _combined(material0, material1):
    t0, t1 = material0.expand(), material1.expand()
    a, c = t0.a + t1.a, t0.c + t1.c
    b = t0.b + t1.b if isinstance(t0, Triple) else None
    return a, b, c


@settings(max_examples=10, deadline=None)
@given(correction_party=st.sampled_from([0, 1]), order=st.permutations(REQUESTS))
def test_dealt_material_forms_valid_triples(correction_party, order):
    dealt0, dealt1 = TrustedDealer(correction_party).deal(order)
    assert [m.request for m in dealt0] == [m.request for m in dealt1] == list(order)
    for request, m0, m1 in zip(order, dealt0, dealt1):
        a, b, c = _combined(m0, m1)
        expected = {Op.MUL: lambda: a * b, Op.MATMUL: lambda: ring_matmul(a, b), Op.SQUARE: lambda: a * a}
        assert torch.equal(c, expected[request.op]())
        m0.expand().check(request)
        m1.expand().check(request)


@pytest.mark.parametrize("correction_party", [0, 1])
def test_seed_compression_costs(correction_party):
    request = TripleRequest.matmul((768, 384), (384, 64))
    material = TrustedDealer(correction_party).deal([request])
    fixed, corrected = material[1 - correction_party][0], material[correction_party][0]
    assert fixed.masked_c is None and fixed.nbytes == 32
    assert corrected.nbytes == 32 + 8 * 768 * 64
    assert len(fixed.seed) == len(corrected.seed) == 32 and fixed.seed != corrected.seed


def test_party_material_is_reproducible_from_its_seed_only():
    (m0,), (m1,) = TrustedDealer().deal([TripleRequest.mul((5,))])
    again = SeededMaterial(m1.request, 1, m1.seed, m1.masked_c).expand()
    assert torch.equal(again.a, m1.expand().a) and torch.equal(again.c, m1.expand().c)
    # Another seed gives unrelated shares: the seed is what must stay confidential.
    other = SeededMaterial(m1.request, 1, new_seed(), m1.masked_c).expand()
    assert not torch.equal(other.a, again.a)


def test_convenience_methods_deal_one_request_for_both_parties():
    dealer = TrustedDealer()
    for pair, op in [
        (dealer.mul_triple((2, 2)), Op.MUL),
        (dealer.matmul_triple((2, 3), (3, 1)), Op.MATMUL),
        (dealer.square_pair((4,)), Op.SQUARE),
    ]:
        assert [m.party for m in pair] == [0, 1] and pair[0].request.op is op
    assert isinstance(dealer.square_pair((4,))[0].expand(), SquarePair)
    assert isinstance(dealer, Dealer)


def test_offline_bulk_material_is_consumed_in_order():
    dealt0, dealt1 = TrustedDealer().deal(REQUESTS * 3)
    queue0, queue1 = MaterialQueue(0), MaterialQueue(1)
    queue0.extend(dealt0)
    queue1.extend(dealt1)
    assert len(queue0) == len(queue1) == 12
    for request in REQUESTS * 3:
        t0, t1 = queue0.draw(request), queue1.draw(request)
        assert torch.equal(t0.c + t1.c, request.evaluate(t0.a + t1.a, t0.b + t1.b if isinstance(t0, Triple) else None))
    with pytest.raises(LookupError, match="no dealer material"):
        queue0.draw(REQUESTS[0])


def test_queue_rejects_out_of_order_and_foreign_material():
    dealt0, dealt1 = TrustedDealer().deal(REQUESTS[:2])
    queue = MaterialQueue(0)
    queue.extend(dealt0)
    with pytest.raises(ValueError, match="out of order"):
        queue.draw(REQUESTS[1])
    assert len(queue) == 2  # nothing consumed
    with pytest.raises(ValueError, match="party 1"):
        queue.extend(dealt1)
    with pytest.raises(TypeError, match="SeededMaterial"):
        queue.extend([REQUESTS[0]])


def test_online_queues_deal_on_demand():
    queue0, queue1 = TrustedDealer().online_queues()
    t1 = queue1.draw(REQUESTS[0])  # party 1 asks first: both queues get the material
    assert len(queue0) == 1
    t0 = queue0.draw(REQUESTS[0])
    assert torch.equal(t0.c + t1.c, (t0.a + t1.a) * (t0.b + t1.b))


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: TripleRequest.mul((2, 3)).__class__(Op.MUL, (2, 3), (3, 2)), ValueError, "equal shapes"),
        (lambda: TripleRequest.matmul((2, 3), (4, 2)), ValueError, "matmul needs"),
        (lambda: TripleRequest.matmul((3,), (3, 2)), ValueError, "matmul needs"),
        (lambda: TripleRequest(Op.SQUARE, (2,), (2,)), ValueError, "no y_shape"),
        (lambda: TripleRequest(Op.MUL, (2,)), ValueError, "needs y_shape"),
        (lambda: TripleRequest("div", (2,), (2,)), ValueError, "div"),
        (lambda: TripleRequest.mul((2, -1)), ValueError, "non-negative"),
        (lambda: TripleRequest.mul(5), TypeError, "sequence"),
        (lambda: TrustedDealer(2), ValueError, "correction_party"),
        (lambda: TrustedDealer().deal([("mul", (2,))]), TypeError, "TripleRequest"),
        (lambda: MaterialQueue(3), ValueError, "party"),
        (lambda: SeededMaterial(REQUESTS[0], 0, b"short"), ValueError, "32 bytes"),
        (lambda: SeededMaterial(REQUESTS[0], 1, new_seed(), torch.zeros(2, 2, dtype=torch.int64)), ValueError, "shape"),
        (lambda: SeededMaterial(REQUESTS[0], 1, new_seed(), torch.zeros(3, 4)), TypeError, "int64"),
    ],
)
def test_validation(build, error, match):
    with pytest.raises(error, match=match):
        build()
