"""Rollback points: a failed truncation in a weight gradient is undone, not kept.

A local truncation fails with probability ~|v| * 2^-32 per element (docs/mpc.md); in a weight
gradient the failure puts ~2^32 into the tenant's halves and the step's own openings do not show
it. The next step's do, and the cloud then undoes that step and the one before it; the client
follows at its reconcile. These tests make a truncation fail for real (one party's local
division off by 2^(64 - bits), what a wrap of the shares does) and check both parties return to
the model before the failed step.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.model import build_split
from flower_split.mpc import decode
from flower_split.protocol import ProtocolError
from flower_split.protocol.opened_range import OutOfRange
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.protocol.secure_rollback import ROLLBACK_DEPTH, RollbackPoints
from flower_split.protocol.secure_party import Halves, Optim
from flower_split.transport.secure_inprocess import SecureLocalTransport

share_module = importlib.import_module("flower_split.mpc.share")  # the package exports a function `share`

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _halves(updates: int) -> Halves:
    halves = Halves(0, {"w": torch.full((2,), updates, dtype=torch.int64)}, Optim(0.1, 0.1, 0.1, 0.9, 0.0, 0.0, 10),
                    16, 8)
    halves.updates = {"head": updates, "tail": updates}
    return halves


def _trained(steps: int) -> tuple[Halves, RollbackPoints]:
    """Halves after ``steps`` training steps, with the points a party keeps before each."""
    halves, points = _halves(0), RollbackPoints()
    for step in range(steps):
        points.push(halves.snapshot())
        halves.restore(_halves(step + 1).snapshot())
    return halves, points


def test_points_keep_the_last_two_steps_and_reconcile_returns_to_the_peers_counts() -> None:
    halves, points = _trained(5)
    assert len(points) == ROLLBACK_DEPTH == 2
    points.reconcile(halves, {"head": 3, "tail": 3}, "t")  # two steps back: the older point
    assert halves.updates == {"head": 3, "tail": 3} and int(halves.weights["w"][0]) == 3 and len(points) == 0
    halves, points = _trained(5)
    points.reconcile(halves, {"head": 7, "tail": 7}, "t")  # the peer is two ahead: it rolls back, not us
    assert halves.updates == {"head": 5, "tail": 5} and len(points) == 2
    for peer in ({"head": 2, "tail": 2}, {"head": 8, "tail": 8}, {"head": 5, "tail": 4}):
        with pytest.raises(ProtocolError, match="diverged beyond 2 steps"):
            _trained(5)[1].reconcile(_trained(5)[0], peer, "t")


def test_points_load_a_state_saved_with_one_pre_step_point() -> None:
    halves, _ = _trained(1)
    legacy = {"pre_step": {"weights": {"w": torch.zeros(2, dtype=torch.int64)}, "buffers": {},
                           "updates": {"head": 0, "tail": 0}}}
    points = RollbackPoints.load(legacy)
    points.reconcile(halves, {"head": 0, "tail": 0}, "t")
    assert halves.updates == {"head": 0, "tail": 0}
    assert len(RollbackPoints.load({"pre_step": None})) == 0
    assert len(RollbackPoints.load({"rollback": RollbackPoints(_trained(3)[1].points).export()})) == 2


def _parties(mode: str):
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", label_protection=mode,
                       lr_head=0.05, lr_tail=0.3, lr_classifier=0.5)
    parts = build_split("tiny", 77, 4, 8)
    dealer = SecureDealerParty()
    cloud = SecureCloudParty(parts.body, dealer.public)
    client = SecureClientParty("t0", parts.embedder, copy.deepcopy(parts.head), copy.deepcopy(parts.tail), config, 10)
    transport = SecureLocalTransport(cloud, dealer)
    transport.connect(client)
    return client, cloud, transport


def _model(client: SecureClientParty, cloud: SecureCloudParty) -> dict[str, torch.Tensor]:
    mine, theirs = client.export_halves(), cloud.export_halves(client.tenant)
    return {k: decode(mine[k] + theirs[k]) for k in mine}


def _fail_one_truncation(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> dict[str, int]:
    """The cloud's next local truncation of a tensor of ``shape`` comes out 2^(64 - bits) off in
    one element: what a wrap of the two shares does to the shared value."""
    state = {"failed": 0}
    truncate = share_module.AdditiveShare.truncate

    def failing(self, bits):
        result = truncate(self, bits)
        if bits and self.party == 0 and tuple(self.shape) == shape and not state["failed"]:
            result.data.view(-1)[0] += 1 << (64 - bits - 1) << 1  # 2^(64 - bits), wrapping in int64
            state["failed"] = 1
        return result

    monkeypatch.setattr(share_module.AdditiveShare, "truncate", failing)
    return state


@pytest.mark.parametrize("mode", ["client", "he"])
@pytest.mark.parametrize("undo_previous", [True, False])
def test_a_failed_truncation_in_a_weight_gradient_is_undone_with_the_step_that_shows_it(
        mode: str, undo_previous: bool, secure_data: TokenizedDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    client, cloud, transport = _parties(mode)
    batch = secure_data.collate(list(range(8)))
    transport.run_step(client, batch)
    before = _model(client, cloud)
    weight_shape = tuple(cloud.export_halves("t0")["cls.Wc"].shape)
    failure = _fail_one_truncation(monkeypatch, weight_shape)
    transport.run_step(client, batch)  # the failure is in this step's classifier gradient; nothing opened shows it
    monkeypatch.undo()
    assert failure["failed"] == 1
    assert max((v - before[k]).abs().max().item() for k, v in _model(client, cloud).items()) > 1e3
    with pytest.raises(OutOfRange):  # the next step's logits do
        transport.run_step(client, batch)
    # what the strategy does when it drops the tenant, then the next step's begin on both sides
    cloud.abort_step("t0", undo_previous=undo_previous)
    client.reconcile(cloud.counts("t0"))
    cloud.reconcile("t0", client.counts)
    after = _model(client, cloud)
    worst = max((v - before[k]).abs().max().item() for k, v in after.items())
    if undo_previous:
        assert worst == 0.0 and client.counts == cloud.counts("t0") == {"head": 1, "tail": 1, "loads": 0}
        transport.run_step(client, batch)  # and training goes on
        assert client.counts == {"head": 2, "tail": 2, "loads": 0}
    else:  # one rollback point is not enough: the garbage stays in the model
        assert worst > 1e3
