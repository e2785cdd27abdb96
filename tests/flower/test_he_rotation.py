"""CKKS key rotation (docs/he.md section 6): the parties in process, and the strategy over Flower.

The client keeps encrypting under its old key until it sees the cloud holding the new one,
so a rotation lost at any point leaves both parties on one key; the cloud refuses labels
under a key it no longer holds, and rotations that are not a tenant's fresh public context.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.backends import backend_for
from flower_split.config import ConfigError, RunConfig
from flower_split.data import Batch, TokenizedDataset
from flower_split.he import ClientKeys
from flower_split.model import build_split, load_encoder, split_encoder
from flower_split.mpc import decode
from flower_split.protocol import KeyRotation, ProtocolError
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_weights import load_plaintext_weights
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.flower.context_state import records_to_state
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.secure_records import pack_key_rotation, unpack_key_rotation
from flower_split.transport.secure_inprocess import SecureLocalTransport
from flower_split.flower.dealer_link import ColocatedDealer
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.strategy_utils import RoundReport

TOTAL_STEPS = 10
HE_LOSS_TOLERANCE = 2e-3  # fixed-point forward + HE loss at B = 8 (docs/secure.md section 5)
FLOWER = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 8, "max-length": 24, "max-train-samples": 64, "max-test-samples": 16,
          "local-steps": 1, "num-server-rounds": 4, "min-nodes": 2, "reply-timeout": 120.0,
          "security": "secure", "label-protection": "he", "global-eval": False, "he-key-rotation-every": 1,
          "insecure-colocated-dealer": True}  # the dealer's place is not what these tests are about


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(secure_data: TokenizedDataset, index: int) -> Batch:
    return secure_data.collate(list(range(8 * index, 8 * index + 8)))


def _client(parts, mode: str = "he") -> SecureClientParty:
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", label_protection=mode,
                       lr_head=0.05, lr_tail=0.3)
    return SecureClientParty("t0", parts.embedder, copy.deepcopy(parts.head), copy.deepcopy(parts.tail), config,
                             TOTAL_STEPS)


def _parties(mode: str = "he"):
    """A set-up tenant "t0" (tiny model) with its cloud and dealer, and the model's parts."""
    parts = build_split("tiny", 77, 4, 8)
    dealer = SecureDealerParty()
    cloud = SecureCloudParty(parts.body, dealer.public)
    client = _client(parts, mode)
    transport = SecureLocalTransport(cloud, dealer)
    transport.connect(client)
    return parts, client, cloud, transport


def _plain_loss(parts, client: SecureClientParty, cloud: SecureCloudParty, batch: Batch) -> float:
    """Cross-entropy, in plaintext, of the model the two parties' halves add up to."""
    mine, theirs = client.export_halves(), cloud.export_halves(client.tenant)
    head, tail = copy.deepcopy(parts.head), copy.deepcopy(parts.tail)
    load_plaintext_weights(head, tail, {k: decode(mine[k] + theirs[k]).float() for k in mine})
    with torch.no_grad():
        mask = batch.attention_mask
        logits = tail(parts.body(head(parts.embedder(batch.input_ids)), mask), mask)
    return float(F.cross_entropy(logits.double(), batch.labels))


def _train_and_check_loss(parts, client, cloud, transport, batch: Batch) -> None:
    expected = _plain_loss(parts, client, cloud, batch)
    step = transport.run_step(client, batch)
    assert client.pop_result(step).loss == pytest.approx(expected, abs=HE_LOSS_TOLERANCE)


def _same(a, b) -> bool:
    """Deep equality of state dicts, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# the parties


def test_rotation_then_training_continues_with_the_plaintext_loss(secure_data: TokenizedDataset) -> None:
    parts, client, cloud, transport = _parties()
    first = client.he_key_id
    _train_and_check_loss(parts, client, cloud, transport, _batch(secure_data, 0))
    rotation = client.start_key_rotation()
    assert rotation.previous_key_id == first and client.he_key_id == first  # pending until acknowledged
    key_id = cloud.accept_key_rotation(rotation)
    assert key_id == rotation.key_id == cloud.he_key_id("t0") != first
    assert cloud.tenants["t0"].he_material.keys.key_id == key_id  # no loss randomness under the old key
    assert client.confirm_key_rotation(key_id)
    assert client.he_key_id == key_id and client.pending_he_key_id is None
    _train_and_check_loss(parts, client, cloud, transport, _batch(secure_data, 1))
    second = transport.rotate_keys(client)  # the same exchange, in the in-process driver
    assert second not in (first, key_id) and client.he_key_id == cloud.he_key_id("t0") == second
    _train_and_check_loss(parts, client, cloud, transport, _batch(secure_data, 2))


def test_labels_under_the_old_key_are_rejected_without_state_change(secure_data: TokenizedDataset) -> None:
    _, client, cloud, transport = _parties()
    old = client.he_key_id
    cloud.accept_key_rotation(client.start_key_rotation())  # the acknowledgement does not reach the client
    assert client.he_key_id == old != cloud.he_key_id("t0")
    message = client.begin(_batch(secure_data, 0), cloud_step=cloud.next_step("t0"))
    before = cloud.state_dict()
    for deliver in (cloud.material_request, cloud.handle):
        with pytest.raises(ProtocolError, match=f"key id {old.hex()} does not match this tenant's key .*rotated key"):
            deliver(message)
        assert _same(before, cloud.state_dict())
    # the acknowledgement arrives: the client drops its dead step, switches, and trains on
    client.reconcile(cloud.counts("t0"))
    assert client.confirm_key_rotation(cloud.he_key_id("t0"))
    step = transport.run_step(client, _batch(secure_data, 1))
    assert math.isfinite(client.pop_result(step).loss)


def test_bad_rotations_are_rejected_and_change_nothing(secure_data: TokenizedDataset) -> None:
    _, client, cloud, transport = _parties()
    current = cloud.he_key_id("t0")
    good = client.start_key_rotation()
    fresh = client.he_keys.rotate()
    other_params = ClientKeys.generate(dataclasses.replace(client.he_keys.params, logprob_frac_bits=8))
    replace = lambda **kw: dataclasses.replace(good, **kw)  # noqa: E731
    bad = {
        "contains a secret key": replace(key_id=fresh.key_id, he_public=fresh.to_bytes()),
        "stale or replayed": replace(previous_key_id=fresh.key_id),
        "unknown tenant 't1'": replace(tenant="t1"),
        "is not the id of he_public": replace(key_id=fresh.key_id),
        "already holds": replace(key_id=current, he_public=client.he_keys.public_bytes()),
        "keeps the HE parameters": replace(key_id=other_params.key_id, he_public=other_params.public_bytes()),
        "bad magic": replace(he_public=b"XXXX" + good.he_public[4:]),
        "must be bytes": replace(key_id=good.key_id.hex()),
        "expected KeyRotation": client.he_keys.public_bytes(),
    }
    before = cloud.state_dict()
    for reason, rotation in bad.items():
        with pytest.raises(ProtocolError, match=reason):
            cloud.accept_key_rotation(rotation)
        assert _same(before, cloud.state_dict()), f"cloud state changed by a rotation that {reason}"
    # not while a step is in flight
    message = client.begin(_batch(secure_data, 0), cloud_step=cloud.next_step("t0"))
    cloud.accept_material(transport.dealer.handle(cloud.material_request(message)))
    cloud.handle(message)
    with pytest.raises(ProtocolError, match="step 0 is in flight"):
        cloud.accept_key_rotation(good)
    cloud.abort_step("t0")
    assert cloud.accept_key_rotation(good) == good.key_id  # control: the genuine rotation goes through


def test_unacknowledged_rotation_keeps_the_client_on_its_old_key(secure_data: TokenizedDataset) -> None:
    """The rotation is lost on its way to the cloud: the client trains on under its old key
    (also after a state reload, as under Flower) and a retry sends the same rotation."""
    parts, client, cloud, transport = _parties()
    old = client.he_key_id
    lost = client.start_key_rotation()
    reloaded = _client(parts)
    reloaded.load_state_dict(client.state_dict())
    client = reloaded
    assert client.pending_he_key_id == lost.key_id
    assert not client.confirm_key_rotation(cloud.he_key_id("t0"))  # the cloud still holds the old key
    assert client.he_key_id == old == cloud.he_key_id("t0")
    for index in range(2):
        _train_and_check_loss(parts, client, cloud, transport, _batch(secure_data, index))
    assert client.he_key_id == old and client.pending_he_key_id == lost.key_id
    retry = client.start_key_rotation()
    assert retry == lost
    assert client.confirm_key_rotation(cloud.accept_key_rotation(retry))
    _train_and_check_loss(parts, client, cloud, transport, _batch(secure_data, 2))


def test_client_label_protection_has_no_keys_to_rotate() -> None:
    _, client, cloud, _ = _parties("client")
    assert client.he_key_id is None and cloud.he_key_id("t0") is None
    with pytest.raises(ProtocolError, match="'client' has no CKKS keys to rotate"):
        client.start_key_rotation()
    keys = ClientKeys.generate()
    with pytest.raises(ProtocolError, match="'client' has no CKKS keys"):
        cloud.accept_key_rotation(KeyRotation("t0", keys.key_id, keys.key_id, keys.public_bytes()))


def test_key_rotation_round_trips_through_records() -> None:
    keys = ClientKeys.generate()
    rotation = KeyRotation("tenant-0", b"\x01" * 16, keys.key_id, keys.public_bytes())
    assert unpack_key_rotation(pack_key_rotation(rotation), "tenant-0") == rotation
    with pytest.raises(ProtocolError, match="the node serves tenant 'tenant-1'"):
        unpack_key_rotation(pack_key_rotation(rotation), "tenant-1")


# ---------------------------------------------------------------------------------------------
# over Flower


class LossyGrid(LocalGrid):
    """A LocalGrid that loses chosen messages, once each.

    ``losses[(server_round, node, message_type)]``: ``"request"`` (never delivered) or
    ``"reply"`` (the client handles it, its reply is lost).
    """

    def __init__(self, client_app, num_nodes: int, losses: dict[tuple[int, int, str], str]) -> None:
        super().__init__(client_app, num_nodes, unpinned=True)
        self.losses = dict(losses)

    def deliver(self, message: Message) -> Message | None:  # both lockstep and streamed messages
        meta = message.metadata
        loss = self.losses.pop((int(meta.group_id), meta.dst_node_id, meta.message_type), None)
        if loss == "request":
            return None
        reply = self.client_app(message, self.contexts[meta.dst_node_id])
        return None if loss == "reply" else reply


def _strategy(every: int) -> SecureSplitStrategy:
    _, body = split_encoder(load_encoder("tiny", seed=0))
    dealer = SecureDealerParty()
    return SecureSplitStrategy(SecureCloudParty(body, dealer.public), ColocatedDealer(dealer), local_steps=1,
                               reply_timeout=120.0,
                               global_eval=False, he_key_rotation_every=every)


def _client_keys(grid: LocalGrid, node: int) -> tuple[bytes, bytes | None]:
    """A tenant's current and pending CKKS key ids, from its Context.state."""
    state = grid.contexts[node].state
    party = records_to_state(state["secure.arrays"], state["secure.config"])
    pending = party["he_pending_keys"]
    return ClientKeys.from_bytes(party["he_keys"]).key_id, None if pending is None else \
        ClientKeys.from_bytes(pending).key_id


def test_strategy_rotates_every_n_rounds(task_identity: None) -> None:
    grid = LocalGrid(make_client_app({**FLOWER, "he-key-rotation-every": 2}), 2, unpinned=True)
    strategy = _strategy(every=2)
    keys, reports = [], []
    for server_round in (1, 2, 3):
        reports.append(strategy.train_round(grid, server_round))
        cloud = {node: strategy.cloud.he_key_id(strategy.tenant_of[node]) for node in (1, 2)}
        assert all(_client_keys(grid, node) == (cloud[node], None) for node in (1, 2))
        keys.append(cloud)
    assert all(not r.dropped and r.tenants == ["tenant-0", "tenant-1"] and r.num_examples > 0 for r in reports)
    assert keys[0] == keys[1] and all(keys[2][node] != keys[1][node] for node in (1, 2))  # before round 3 only
    assert [r.round_trips for r in reports] == [10, 10, 11]  # the rotation: one round trip for all tenants


def test_lost_rotation_messages_leave_both_sides_on_one_key(task_identity: None) -> None:
    """Round 2: tenant-1's rotation reply is lost (the cloud keeps the old key). Round 3: its
    retried rotation goes through, but the acknowledgement (secure_begin) is lost. The client
    never switches without it, and round 4 brings both sides to the same new key."""
    losses = {(2, 2, "train.secure_rekey"): "reply", (3, 2, "train.secure_begin"): "request"}
    grid = LossyGrid(make_client_app(FLOWER), 2, losses)
    strategy = _strategy(every=1)
    reports: list[RoundReport] = [strategy.train_round(grid, 1)]
    initial = strategy.cloud.he_key_id("tenant-1")

    reports.append(strategy.train_round(grid, 2))
    assert list(reports[-1].dropped) == ["tenant-1"] and reports[-1].tenants == ["tenant-0"]
    assert "train.secure_rekey: no reply" in reports[-1].dropped["tenant-1"]
    current, pending = _client_keys(grid, 2)
    assert strategy.cloud.he_key_id("tenant-1") == current == initial and pending is not None

    reports.append(strategy.train_round(grid, 3))
    assert list(reports[-1].dropped) == ["tenant-1"] and reports[-1].tenants == ["tenant-0"]
    assert "train.secure_begin: no reply" in reports[-1].dropped["tenant-1"]
    assert strategy.cloud.he_key_id("tenant-1") == pending  # the retry was the same rotation
    assert _client_keys(grid, 2) == (initial, pending)  # no acknowledgement, no switch

    reports.append(strategy.train_round(grid, 4))
    assert not reports[-1].dropped and reports[-1].tenants == ["tenant-0", "tenant-1"]
    final = strategy.cloud.he_key_id("tenant-1")
    assert final not in (initial, pending) and _client_keys(grid, 2) == (final, None)
    assert all(r.train_loss is None and r.num_examples > 0 for r in reports)  # trained (secure: no loss reported)


# ---------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bad_rotation_settings_are_rejected(value: object) -> None:
    with pytest.raises(ConfigError, match="he-key-rotation-every: expected an integer >= 0"):
        settings_from_run_config({**FLOWER, "he-key-rotation-every": value})


@pytest.mark.parametrize("mode", [{"label-protection": "client"}, {"security": "plain"}])
def test_rotation_needs_secure_he(mode: dict[str, str]) -> None:
    config, settings = settings_from_run_config({**FLOWER, **mode})
    with pytest.raises(ConfigError, match="he-key-rotation-every: .* (no|holds no) CKKS keys to rotate"):
        backend_for(config, settings)  # the ServerApp, the ClientApp and simulate all ask the backend
    config, settings = settings_from_run_config({**FLOWER, **mode, "he-key-rotation-every": 0})
    assert backend_for(config, settings).name == config.security and settings.he_key_rotation_every == 0


def test_strategy_refuses_a_bad_rotation_interval() -> None:
    with pytest.raises(ValueError, match="he_key_rotation_every must be an integer >= 0"):
        _strategy(every=-1)
