"""A secure tenant's reply to a sharing load is lost: the cloud completes the load later.

A tenant that loaded the mean but whose acknowledgement never reached the cloud holds its mean
half against the cloud's old half: their sum is no model at all (a hostile review, L1). The load
is therefore numbered and counted on both sides; the cloud keeps its mean halves as the
tenant's pending load, and at the tenant's next begin the tenant's count says whether it loaded
(``CloudTenant.settle_load``). The tenant never undoes a load: a tenant back on a model it has
shared would let the cloud difference two aggregates (a second review).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.context_state import records_to_state
from flower_split.flower.contract import MessageType
from flower_split.flower.dealer_link import NodeDealer
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.sharing_server import SecAggSharing
from flower_split.flower.strategy_utils import RoundReport
from flower_split.model import load_encoder, split_encoder
from flower_split.mpc import decode
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_cloud_tenant import CloudTenant
from flower_split.state import read_party
from flower_helpers import LocalGrid
from test_sharing import SECURE, THREE


class LostReply(LocalGrid):
    """Node 1's reply to the share load never reaches the cloud; with ``before``, neither does
    the load itself (the tenant never loads)."""

    def __init__(self, *args, before: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before = before

    def deliver(self, message):
        lost = message.metadata.dst_node_id == 1 and message.metadata.message_type == MessageType.SHARE_LOAD
        if lost and self.before:
            return None
        reply = super().deliver(message)
        return None if lost else reply


def _client_state(grid: LocalGrid, node: int) -> dict:
    return records_to_state(grid.contexts[node].state["secure.arrays"], grid.contexts[node].state["secure.config"])


def _model(grid: LocalGrid, strategy: SecureSplitStrategy, node: int) -> dict[str, torch.Tensor]:
    cloud = strategy.cloud.tenants[strategy.tenant_of[node]].halves.weights
    return {k: decode(v + cloud[k]) for k, v in _client_state(grid, node)["halves"]["weights"].items()}


def _run(tmp_path: Path, before: bool = False) -> tuple[LostReply, SecureSplitStrategy, list[RoundReport]]:
    config = {**SECURE, "share": "all", "num-server-rounds": 2}
    grid = LostReply(make_client_app(config), 3, dealer=tmp_path, node_config=THREE,
                     sharing_keys=tmp_path / "share", before=before)
    _, body = split_encoder(load_encoder("tiny", seed=0))
    strategy = SecureSplitStrategy(SecureCloudParty(body, None), NodeDealer(120.0), local_steps=2,
                                   reply_timeout=120.0, global_eval=False)
    strategy.sharing = SecAggSharing("secure", "all", 0.5, 120.0)
    reports: list = []
    strategy.start(grid, 2, eval_every=1, on_report=reports.append)
    return grid, strategy, [r for r in reports if isinstance(r, RoundReport)]


def test_a_load_whose_acknowledgement_was_lost_is_completed_at_the_tenants_next_step(
        task_identity: None, tmp_path: Path) -> None:
    grid, strategy, rounds = _run(tmp_path)
    victim = strategy.tenant_of[1]
    assert rounds[0].sharing.tenants == sorted(strategy.tenant_of[n] for n in (2, 3))
    assert rounds[0].sharing.pending == [victim] and victim not in rounds[0].sharing.dropped
    assert rounds[1].dropped == {}  # round 2: every tenant trains, the victim on the mean it loaded
    assert _client_state(grid, 1)["halves"]["loads"] == strategy.cloud.counts(victim)["loads"] == 1  # (none after the last)
    assert strategy.cloud.tenants[victim].pending_load is None
    worst = max(float(w.abs().max()) for w in _model(grid, strategy, 1).values())
    assert worst < 100, f"the victim's model holds garbage (|w| up to {worst:.3g})"


def test_a_load_that_never_arrived_is_dropped_and_the_tenant_goes_on_from_its_own_model(
        task_identity: None, tmp_path: Path) -> None:
    grid, strategy, rounds = _run(tmp_path, before=True)
    victim = strategy.tenant_of[1]
    assert rounds[0].sharing.pending == [victim] and victim not in rounds[0].sharing.dropped
    assert rounds[1].dropped == {}
    assert _client_state(grid, 1)["halves"]["loads"] == strategy.cloud.counts(victim)["loads"] == 0
    assert strategy.cloud.tenants[victim].pending_load is None
    worst = max(float(w.abs().max()) for w in _model(grid, strategy, 1).values())
    assert worst < 100, f"the victim's model holds garbage (|w| up to {worst:.3g})"


def test_control_without_completing_the_load_the_victim_is_lost(
        task_identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failing control: a cloud that forgets the pending load cannot match the tenant again."""
    original = CloudTenant.settle_load

    def forgetful(self: CloudTenant, tenant_loads: int, who: str = "cloud") -> None:
        self.pending_load = None
        original(self, tenant_loads, who)

    monkeypatch.setattr(CloudTenant, "settle_load", forgetful)
    grid, strategy, rounds = _run(tmp_path)
    victim = strategy.tenant_of[1]
    assert "cannot be matched" in rounds[1].dropped[victim]


class CloudCrash(Exception):
    """The ServerApp process dies."""


class CrashAtLoad(LocalGrid):
    """The ServerApp dies while it sends the share loads: nodes 1 and 2 have loaded, node 3 never gets its load."""

    def deliver(self, message):
        if message.metadata.dst_node_id == 3 and message.metadata.message_type == MessageType.SHARE_LOAD:
            raise CloudCrash
        return super().deliver(message)


def test_a_serverapp_that_dies_while_sending_the_loads_completes_them_after_its_restart(
        task_identity: None, tmp_path: Path) -> None:
    config = {**SECURE, "share": "all", "num-server-rounds": 2, "state-dir": str(tmp_path / "cloud"), "session": "s"}
    nodes = {**THREE, "state-dir": str(tmp_path / "nodes")}
    first = CrashAtLoad(make_client_app(config), 3, dealer=tmp_path / "keys", node_config=nodes,
                        sharing_keys=tmp_path / "share")
    with pytest.raises(CloudCrash):
        run_cloud(first, config)
    saved = read_party(tmp_path / "cloud" / "s" / "cloud", "cloud").state["cloud"]["tenants"]
    assert all(record["pending_load"]["number"] == 1 for record in saved.values())  # saved before any was sent
    second = LocalGrid(make_client_app(config), 3, node_config=nodes)
    second.contexts = {node: Context(run_id=2, node_id=node, node_config=dict(context.node_config), state=RecordDict(),
                                     run_config={}) for node, context in first.contexts.items()}
    reports: list = []
    run_cloud(second, config, reports.append)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert [r.server_round for r in rounds] == [1, 2]
    assert rounds[0].tenants == [] and rounds[0].sharing.tenants == []  # round 1 resumed after its last step: no phase
    assert rounds[1].dropped == {} and len(rounds[1].tenants) == 3
    strategy_state = read_party(tmp_path / "cloud" / "s" / "cloud", "cloud").state["cloud"]["tenants"]
    for node, tenant in ((1, "tenant-0"), (2, "tenant-1"), (3, "tenant-2")):
        halves = _client_state(second, node)["halves"]
        assert strategy_state[tenant]["pending_load"] is None
        loads = 0 if node == 3 else 1  # nodes 1 and 2 loaded before the crash; the cloud completed theirs
        assert strategy_state[tenant]["halves"]["loads"] == halves["loads"] == loads
        model = {k: decode(v + strategy_state[tenant]["halves"]["weights"][k]) for k, v in halves["weights"].items()}
        assert max(float(w.abs().max()) for w in model.values()) < 100, tenant
