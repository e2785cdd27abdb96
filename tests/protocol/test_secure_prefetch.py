"""Material asked ahead (docs/secure.md §9): the cloud asks the dealer for a tenant's next
training step from the shape the tenant announced, so that step's begin costs no dealer
round trip. It must serve exactly the announced step and shape, once."""

from __future__ import annotations

import pytest

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.model import build_split
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.protocol.secure_shape import step_shape
from flower_split.transport.secure_inprocess import SecureLocalTransport


def _parties(data: TokenizedDataset) -> tuple[SecureClientParty, SecureCloudParty, SecureDealerParty]:
    parts = build_split("tiny", 77, 4, 8)
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", label_protection="client",
                       lr_head=0.02, lr_tail=0.3, seed=0).validate()
    dealer = SecureDealerParty()
    cloud = SecureCloudParty(parts.body, dealer.public)
    client = SecureClientParty("t0", parts.embedder, parts.head, parts.tail, config, 100)
    SecureLocalTransport(cloud, dealer).connect(client)
    return client, cloud, dealer


def _finish(client: SecureClientParty, cloud: SecureCloudParty, first) -> None:
    reply = cloud.handle(first)
    while reply is not None:
        message = client.handle(reply)
        if message is None:
            break
        reply = cloud.handle(message)


def test_material_asked_ahead_serves_the_announced_step_without_a_request(secure_data: TokenizedDataset) -> None:
    client, cloud, dealer = _parties(secure_data)
    batch = secure_data.collate(list(range(8)))
    request = cloud.prefetch_request("t0", *step_shape(batch.attention_mask))
    assert request.step == cloud.next_step("t0") == 0
    cloud.accept_material(dealer.handle(request))
    first = client.begin(batch, cloud_step=cloud.next_step("t0"))
    assert cloud.material_request(first) is None  # ready: nothing to ask the dealer
    _finish(client, cloud, first)
    assert cloud.next_step("t0") == 1 and client.pop_result(0).loss is not None
    with pytest.raises(ProtocolError, match="already served"):
        dealer.handle(request)  # the dealer deals a number once, ahead or not


def test_a_first_message_off_its_announced_shape_spends_the_number(secure_data: TokenizedDataset) -> None:
    client, cloud, dealer = _parties(secure_data)
    announced = secure_data.collate(list(range(8)))
    cloud.accept_material(dealer.handle(cloud.prefetch_request("t0", *step_shape(announced.attention_mask))))
    first = client.begin(secure_data.collate(list(range(4))), cloud_step=cloud.next_step("t0"))
    with pytest.raises(ProtocolError, match="does not match the shape it announced"):
        cloud.material_request(first)
    assert cloud.next_step("t0") == 1  # step 0 is spent: the next begin uses 1
    cloud.abort_step("t0")
    client.reconcile(cloud.counts("t0"))
    retry = client.begin(secure_data.collate(list(range(4))), cloud_step=cloud.next_step("t0"))
    request = cloud.material_request(retry)
    assert request is not None and request.step == 1
    cloud.accept_material(dealer.handle(request))
    _finish(client, cloud, retry)


def test_an_announced_shape_out_of_bounds_is_refused_before_the_dealer_works(secure_data: TokenizedDataset) -> None:
    _, cloud, _ = _parties(secure_data)
    for batch, tokens, rows in ((0, 8, 8), (8, 2**20, 8), (True, 8, 8), ("8", 8, 8), (4096, 4096, 4096), (8, 8, 7),
                                (8, 8, 65), (8, 8, True), (8, 8, "8"), (8, 8, -1)):
        with pytest.raises(ProtocolError):
            cloud.prefetch_request("t0", batch, tokens, rows)
    assert cloud.tenants["t0"].prefetched is None


@pytest.mark.parametrize("train, rows", [(False, 8), (True, 4)])
def test_a_begin_that_cannot_use_the_material_ahead_moves_past_its_number(secure_data: TokenizedDataset,
                                                                          train: bool, rows: int) -> None:
    """A tenant told what the cloud holds ahead (step 0 for 8 rows of training) and beginning an
    evaluation, or a batch of another shape, takes step 1: step 0 is never opened under, and the
    cloud asks the dealer for step 1 (issue 17: a tenant dropped mid-step, then restarted)."""
    client, cloud, dealer = _parties(secure_data)
    announced = secure_data.collate(list(range(8)))
    cloud.accept_material(dealer.handle(cloud.prefetch_request("t0", *step_shape(announced.attention_mask))))
    ahead = cloud.tenants["t0"].ahead()
    assert ahead == (0, *step_shape(announced.attention_mask))
    first = client.begin(secure_data.collate(list(range(rows))), train=train, cloud_step=cloud.next_step("t0"),
                         ahead=ahead)
    assert first.step == 1
    request = cloud.material_request(first)
    assert request is not None and request.step == 1 and cloud.tenants["t0"].ahead() is None
    cloud.accept_material(dealer.handle(request))
    _finish(client, cloud, first)
    result = client.pop_result(1)
    assert cloud.next_step("t0") == 2 and (result.loss if train else result.logits) is not None


def test_the_announced_batch_uses_the_material_ahead(secure_data: TokenizedDataset) -> None:
    client, cloud, dealer = _parties(secure_data)
    announced = secure_data.collate(list(range(8)))
    cloud.accept_material(dealer.handle(cloud.prefetch_request("t0", *step_shape(announced.attention_mask))))
    with pytest.raises(ProtocolError, match="material ahead must be"):
        client.begin(announced, cloud_step=0, ahead=(0, 8, 14))  # type: ignore[arg-type]
    first = client.begin(announced, cloud_step=0, ahead=cloud.tenants["t0"].ahead())
    assert first.step == 0 and cloud.material_request(first) is None
    _finish(client, cloud, first)
    assert cloud.next_step("t0") == 1
