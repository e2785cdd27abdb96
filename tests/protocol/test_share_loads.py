"""Sharing loads are counted on both parties' halves, so that a lost acknowledgement is completed.

A sharing load replaces some of a tenant's halves on both sides (flower.sharing_*). The tenant
loads only the next load in order and never with a step in flight; the cloud keeps its means as
the tenant's pending load until the tenant's counts say whether it loaded; any other mismatch is
refused before anything is opened. The parties here are the real ones, in process.
"""

from __future__ import annotations

import pytest
import torch

from flower_split.data import TokenizedDataset
from flower_split.mpc import decode
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_cloud_tenant import CloudTenant
from flower_split.protocol.secure_loads import peer_loads
from flower_split.transport.secure_inprocess import SecureLocalTransport
from test_secure_rollback import _parties

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "cls.Wc"


def _model(client: SecureClientParty, cloud: SecureCloudParty) -> torch.Tensor:
    return decode(client.export_halves()[NAME] + cloud.export_halves("t0")[NAME])


def _mean_halves(client: SecureClientParty, cloud: SecureCloudParty) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fresh halves of another model of the classifier (what a sharing phase hands each side)."""
    other = torch.randint(-(1 << 62), 1 << 62, cloud.export_halves("t0")[NAME].shape, dtype=torch.int64)
    return client.export_halves()[NAME] + other, cloud.export_halves("t0")[NAME] - other


def _step(client: SecureClientParty, cloud: SecureCloudParty, transport: SecureLocalTransport, batch) -> None:
    """One training step after both sides reconcile, as the Flower strategy begins one."""
    client.reconcile(cloud.counts("t0"))
    cloud.reconcile("t0", client.counts)
    transport.run_step(client, batch)


def test_a_load_whose_ack_was_lost_is_completed_by_the_cloud_and_the_model_is_whole(
        secure_data: TokenizedDataset) -> None:
    client, cloud, transport = _parties("client")
    batch = secure_data.collate(list(range(8)))
    transport.run_step(client, batch)
    mine, theirs = _mean_halves(client, cloud)
    number = cloud.tenants["t0"].offer_load({NAME: theirs})
    client.load_shared({NAME: mine}, number)  # ... and its ack is lost: the cloud's halves are the old ones
    assert client.counts["loads"] == 1 and cloud.counts("t0")["loads"] == 0
    assert float((_model(client, cloud)).abs().max()) > 1e6  # the pair is no model at all now
    _step(client, cloud, transport, batch)  # the begin's counts say the tenant loaded: the cloud completes it
    assert cloud.counts("t0") == client.counts and cloud.counts("t0")["loads"] == 1
    assert cloud.tenants["t0"].pending_load is None
    assert float(_model(client, cloud).abs().max()) < 10


def test_a_load_the_tenant_never_made_is_dropped(secure_data: TokenizedDataset) -> None:
    client, cloud, transport = _parties("client")
    batch = secure_data.collate(list(range(8)))
    transport.run_step(client, batch)
    before = _model(client, cloud)
    _, theirs = _mean_halves(client, cloud)
    cloud.tenants["t0"].offer_load({NAME: theirs})  # sent, never arrived
    client.reconcile(cloud.counts("t0"))
    cloud.reconcile("t0", client.counts)
    assert cloud.tenants["t0"].pending_load is None and cloud.counts("t0")["loads"] == 0
    assert torch.equal(_model(client, cloud), before)


def test_the_tenant_loads_only_the_next_load_and_never_with_a_step_in_flight(secure_data: TokenizedDataset) -> None:
    client, cloud, transport = _parties("client")
    mine, _ = _mean_halves(client, cloud)
    before = client.state_dict()
    for number in (0, 2):  # a replayed or a skipped load
        with pytest.raises(ProtocolError, match="expected 1"):
            client.load_shared({NAME: mine}, number)
    with pytest.raises(ProtocolError, match="does not match"):
        client.load_shared({NAME: mine[:1]}, 1)
    client.reconcile(cloud.counts("t0"))
    client.begin(secure_data.collate(list(range(8))), train=True, cloud_step=cloud.next_step("t0"))
    with pytest.raises(ProtocolError, match="in flight"):
        client.load_shared({NAME: mine}, 1)
    client.abort_step()
    assert torch.equal(client.state_dict()["halves"]["weights"][NAME], before["halves"]["weights"][NAME])
    assert client.counts["loads"] == 0


@pytest.mark.parametrize("cloud_loads, tenant_loads, pending", [(2, 1, False), (0, 1, False), (0, 2, True)])
def test_counts_that_no_lost_ack_explains_are_refused_before_anything_is_opened(
        cloud_loads: int, tenant_loads: int, pending: bool, secure_data: TokenizedDataset) -> None:
    client, cloud, _ = _parties("client")
    cloud.tenants["t0"].halves.loads, client.halves.loads = cloud_loads, tenant_loads
    if pending:
        cloud.tenants["t0"].pending_load = (cloud_loads + 1, {NAME: cloud.export_halves("t0")[NAME]})
    if cloud_loads > tenant_loads or tenant_loads > cloud_loads + 1:
        with pytest.raises(ProtocolError, match="do not match"):  # the tenant refuses a cloud ahead, or far behind
            client.reconcile(cloud.counts("t0"))
    with pytest.raises(ProtocolError, match="cannot be matched"):
        cloud.reconcile("t0", client.counts)


def test_a_pending_load_survives_the_clouds_saved_state() -> None:
    client, cloud, _ = _parties("client")
    _, theirs = _mean_halves(client, cloud)
    cloud.tenants["t0"].offer_load({NAME: theirs})
    record = CloudTenant.load(cloud.tenants["t0"].export(), 0)
    assert record.pending_load is not None and record.pending_load[0] == 1
    assert torch.equal(record.pending_load[1][NAME], theirs)
    old = cloud.tenants["t0"].export()
    old.pop("pending_load")
    old["halves"].pop("loads")  # a state saved before loads were counted
    record = CloudTenant.load(old, 0)
    assert record.pending_load is None and record.halves.loads == 0


@pytest.mark.parametrize("counts", [{"head": 0, "tail": 0}, {"loads": "1"}, {"loads": True}, {"loads": -1}, None, 3])
def test_malformed_load_counts_are_protocol_errors(counts: object) -> None:
    with pytest.raises(ProtocolError):
        peer_loads(counts, "t")
