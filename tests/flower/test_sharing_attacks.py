"""A malicious cloud against cross-tenant sharing: each attack succeeds on the undefended
tenant and fails on the defended one (flower.sharing_policy, flower.sharing_keys).

The cloud runs the SuperLink: it writes every SecAgg+ stage and relays every public key. Two
attacks recover one tenant's secure adapter halves bit-exactly, i.e. its adapter and classifier
(the cloud holds the other halves):

* a forged phase with the victim alone (threshold 1): its own key share is its mask seed
  (the hostile review of the eighth session);
* sybils: a phase that obeys every rule the victim can check alone (4 participants, a
  majority threshold, pairwise masks with 3 others, the round it trained in) whose other
  participants are the cloud's own SecAgg+ clients contributing zero: Flower's own workflow
  then unmasks the victim's vector. Only pinned keys stop it.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

import flower_split.flower.sharing_client as sharing_client
from flower_split.flower.secagg_prg import FLOWER_MODULES, PRG_NAME
from flower_split.flower.sharing_client import error_reply_mod
from flower_split.apps.client_app import make_client_app
from flower_split.flower.dealer_link import NodeDealer
from flower_split.flower.context_state import records_to_state
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.sharing_policy import note_training_begin, note_training_step
from flower_split.flower.sharing_params import (
    RING_MOD, SECURE_NAMES, SECURE_QUANTIZATION as Q, decode_sum, encode_half, lift_tenant_sum,
)
import flower_split.flower.sharing_views as sharing_views
from flower_split.flower.sharing_views import CONSISTENCY_STAGE, check_view
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flower_split.flower.sharing_server import SecAggSharing, ShareReport, _CountingGrid
from flower_split.model import load_encoder, split_encoder
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_helpers import LocalGrid

SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "batch-size": 16, "max-length": 24, "max-train-samples": 128, "max-test-samples": 32,
          "local-steps": 1, "micro-batches": 1, "num-server-rounds": 2, "min-nodes": 2, "reply-timeout": 120.0,
          "global-eval": False, "eval-every": 0, "security": "secure", "label-protection": "client",
          "share": "all"}
VICTIM, SYBILS = 1, (101, 102, 103)
NAMES = SECURE_NAMES["all"]


class SybilGrid(LocalGrid):
    """Two real tenants (nodes 1, 2) and the cloud's own SecAgg+ clients (``SYBILS``), each
    contributing zero halves of the victim's shapes."""

    def __init__(self, client_app: Any, tmp_path: Any, **kwargs: Any) -> None:
        super().__init__(client_app, 2, dealer=tmp_path / "dealer", **kwargs)
        self.shapes: list[tuple[int, ...]] = []
        self.sybil_app = ClientApp()
        self.sybil_app.train(mods=[error_reply_mod, secaggplus_mod])(self._zero_fit)  # no consistency stage
        self.sybils = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                       for n in SYBILS}

    def _zero_fit(self, message: Message, context: Context) -> Message:
        zeros = [encode_half(torch.zeros(shape, dtype=torch.int64)) for shape in self.shapes]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(zeros), 1, {})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=message)

    def deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        return self.sybil_app(message, self.sybils[node]) if node in self.sybils else super().deliver(message)


def _trained(grid: LocalGrid, rounds: int = 1) -> SecureSplitStrategy:
    """``rounds`` honest training rounds of a 2-round run, no sharing phase: the victim trained in round ``rounds``."""
    _, body = split_encoder(load_encoder("tiny", seed=0))
    strategy = SecureSplitStrategy(SecureCloudParty(body, None), NodeDealer(120.0), local_steps=1,
                                   reply_timeout=120.0, global_eval=False)
    strategy.start(grid, rounds, eval_every=0, on_report=lambda report: None)
    return strategy


def _true_adapter(grid: LocalGrid, strategy: SecureSplitStrategy, node: int) -> dict[str, torch.Tensor]:
    state = grid.contexts[node].state
    tenant = records_to_state(state["secure.arrays"], state["secure.config"])["halves"]["weights"]
    cloud = strategy.cloud.export_halves(strategy.tenant_of[node])
    return {name: tenant[name] + cloud[name] for name in NAMES}


def _opened(residues: list[np.ndarray], strategy: SecureSplitStrategy, node: int) -> dict[str, torch.Tensor]:
    """The victim's adapter from its halves mod 2^31 and the cloud's own halves."""
    cloud = strategy.cloud.export_halves(strategy.tenant_of[node])
    opened = {}
    for name, residue in zip(NAMES, residues):
        tenant = lift_tenant_sum(torch.from_numpy(residue.astype(np.int64)), cloud[name])
        opened[name] = tenant + cloud[name]
    return opened


def _sybil_phase(grid: SybilGrid, strategy: SecureSplitStrategy, server_round: int = 1) -> Any:
    """Flower's SecAgg+ workflow over the victim and the sybils, as the cloud would run it."""
    grid.shapes = [tuple(strategy.cloud.export_halves(strategy.tenant_of[VICTIM])[n].shape) for n in NAMES]
    sharing = SecAggSharing("secure", "all", 0.5, 120.0)
    nodes = {"victim": VICTIM, **{f"sybil-{n}": n for n in SYBILS}}
    counting = _CountingGrid(grid, ShareReport(server_round))
    return sharing._secure_aggregate(counting, nodes, server_round, counting.report)


def _undefended(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tenant as before the policy: Flower's ``secaggplus_mod`` alone."""
    monkeypatch.setattr(sharing_client, "sharing_policy_mod",
                        lambda overrides: lambda message, context, call_next: call_next(message, context))


def _forge_lone_phase(grid: LocalGrid, node: int) -> tuple[list[np.ndarray], str | None]:
    """The review's forged phase: the victim alone, threshold 1; its residues, or the refusal."""
    def send(config: dict[str, Any], extra: dict[str, Any] | None = None) -> Any:
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config), **(extra or {})})
        reply = grid.deliver(Message(content=content, dst_node_id=node, message_type="train", group_id="evil"))
        return reply

    reply = send({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 1, Key.SHARE_NUMBER: 1, Key.THRESHOLD: 1,
                  Key.CLIPPING_RANGE: Q["clipping_range"], Key.TARGET_RANGE: Q["quantization_range"],
                  Key.MOD_RANGE: Q["modulus_range"], Key.MAX_WEIGHT: 1.0})
    if reply.has_error():
        return [], reply.error.reason
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    send({Key.STAGE: Stage.SHARE_KEYS, str(node): [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]})
    fit = {"fitins.config": ConfigRecord({"share": "all", "server-round": 1})}
    reply = send({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}, fit)
    if reply.has_error():
        return [], reply.error.reason
    masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    reply = send({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [node], Key.DEAD_NODE_ID_LIST: []})
    seed = combine_shares(list(reply.content.config_records[RECORD_KEY_CONFIGS][Key.SHARE_LIST][:1]))
    mask = sys.modules[FLOWER_MODULES[0]].pseudo_rand_gen(seed, Q["modulus_range"], [m.shape for m in masked])  # the tenant's generator
    residues = [np.mod(m - k, RING_MOD) for m, k in zip(masked, mask)]
    return residues[1:], None  # residues[0] is SecAgg+'s weight factor


@pytest.mark.parametrize("defended", [False, True])
def test_a_forged_phase_with_the_victim_alone(defended: bool, task_identity: None, tmp_path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if not defended:
        _undefended(monkeypatch)
    grid = LocalGrid(make_client_app(SECURE), 2, dealer=tmp_path, node_config={"allow-unpinned-sharing": True})
    strategy = _trained(grid)
    residues, refused = _forge_lone_phase(grid, VICTIM)
    if defended:
        assert refused is not None and "participants" in refused and residues == []
        return
    opened, truth = _opened(residues, strategy, VICTIM), _true_adapter(grid, strategy, VICTIM)
    assert all(torch.equal(opened[name], truth[name]) for name in NAMES)  # adapter and classifier, bit-exact


@pytest.mark.parametrize("pinned", [False, True])
def test_sybil_participants_open_an_unpinned_tenant_and_not_a_pinned_one(pinned: bool, task_identity: None,
                                                                          tmp_path) -> None:
    keys = {"sharing_keys": tmp_path / "share"} if pinned else {"node_config": {"allow-unpinned-sharing": True}}
    grid = SybilGrid(make_client_app(SECURE), tmp_path, **keys)
    strategy = _trained(grid)
    collect = _sybil_phase(grid, strategy)
    if pinned:  # the victim refuses the unsigned sybil keys: no vector of it reaches the cloud
        assert VICTIM not in collect.included
        return
    # every rule the victim checks alone holds (4 participants, threshold 3, masks with 3 others,
    # the round it trained in): the semi-honest-only guarantee of unpinned sharing, shown
    assert sorted(collect.included) == sorted([VICTIM, *SYBILS])
    residues = [t.numpy() for t in (decode_sum(a, 4) for a in collect.aggregate)]
    opened, truth = _opened(residues, strategy, VICTIM), _true_adapter(grid, strategy, VICTIM)
    assert all(torch.equal(opened[name], truth[name]) for name in NAMES)


def test_one_phase_per_trained_round(task_identity: None, tmp_path) -> None:
    """Two aggregates over the same parameters (nothing trained between them) are refused: the
    second phase of a round, a phase for a round the tenant did not train in."""
    grid = SybilGrid(make_client_app(SECURE), tmp_path, node_config={"allow-unpinned-sharing": True})
    strategy = _trained(grid)
    assert VICTIM in _sybil_phase(grid, strategy, 1).included
    assert VICTIM not in _sybil_phase(grid, strategy, 1).included  # the same round again
    assert VICTIM not in _sybil_phase(grid, strategy, 2).included  # a round it has not trained in


def test_no_phase_after_the_last_round_of_scope_all(task_identity: None, tmp_path) -> None:
    grid = SybilGrid(make_client_app(SECURE), tmp_path, node_config={"allow-unpinned-sharing": True})
    strategy = _trained(grid, 2)
    assert VICTIM not in _sybil_phase(grid, strategy, 2).included  # its final model is its own copy


def test_a_setup_without_a_majority_threshold_the_modes_quantization_or_full_entropy_masks_is_refused(task_identity: None,
                                                                                  tmp_path) -> None:
    grid = LocalGrid(make_client_app(SECURE), 2, dealer=tmp_path, node_config={"allow-unpinned-sharing": True})
    _trained(grid)
    base = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 6, Key.SHARE_NUMBER: 6, Key.THRESHOLD: 4,
            Key.CLIPPING_RANGE: Q["clipping_range"], Key.TARGET_RANGE: Q["quantization_range"],
            Key.MOD_RANGE: Q["modulus_range"], Key.MAX_WEIGHT: 1.0}

    def setup(prg: str | None = PRG_NAME, **changes: Any) -> Message:
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({**base, **changes}),
                              **({"share.prg": ConfigRecord({"prg": prg})} if prg else {})})
        return grid.deliver(Message(content=content, dst_node_id=VICTIM, message_type="train", group_id="1"))

    assert not setup().has_error()
    assert "mask generator None" in setup(prg=None).error.reason  # Flower's own generator: 32-bit seeds
    assert "threshold 3 of 6" in setup(**{Key.THRESHOLD: 3}).error.reason
    assert "quantization" in setup(**{Key.CLIPPING_RANGE: 1.0}).error.reason
    assert "quantization" in setup(**{Key.MAX_WEIGHT: 1000.0}).error.reason
    assert "participants" in setup(**{Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2}).error.reason


def test_a_view_must_name_every_participant_once_and_the_tenant_alive() -> None:
    """The checks a tenant makes of the lists alone (the review's inconsistent views used duplicate
    ids to reach the threshold, and lists that left participants out)."""
    state = SecAggPlusState(threshold=3, public_keys_dict={n: (b"a", b"b") for n in (1, 2, 3, 4)})
    check_view([1, 2, 3], [4], 1, state, 3)
    for alive, dead, reason in (([1, 1, 1], [2, 3, 4], "twice"), ([1, 2, 3], [3, 4], "twice"),
                                ([1, 2, 3], [], "participants"), ([1, 2, 3, 5], [4], "participants"),
                                ([2, 3, 4], [1], "dropped after"), ([1, 2], [3, 4], "threshold")):
        with pytest.raises(ProtocolError, match=reason):
            check_view(alive, dead, 1, state, 3)
    with pytest.raises(ProtocolError, match="floor 4"):  # an aggregate over fewer than the tenant's floor
        check_view([1, 2, 3], [4], 1, state, 4)


class ForgingGrid(LocalGrid):
    """Four pinned tenants; the cloud shows each one its own view in the consistency and unmask
    stages (each view valid on its own: every participant once, the receiver alive, 3 alive)."""

    VIEWS = {1: ([1, 2, 3, 4], []), 2: ([1, 2, 3], [4]), 3: ([1, 3, 4], [2]), 4: ([1, 2, 4], [3])}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unmask_replies: dict[int, Message] = {}

    def deliver(self, message: Message) -> Message | None:
        node, configs = message.metadata.dst_node_id, message.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if stage in (CONSISTENCY_STAGE, Stage.UNMASK):
            configs[Key.ACTIVE_NODE_ID_LIST], configs[Key.DEAD_NODE_ID_LIST] = self.VIEWS[node]
        reply = super().deliver(message)
        if stage == Stage.UNMASK:
            self.unmask_replies[node] = reply
        return reply


@pytest.mark.parametrize("defended", [False, True])
def test_inconsistent_views_get_no_share(defended: bool, task_identity: None, tmp_path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's break of Flower's SecAgg+ by a malicious server: each tenant told another story
    of who dropped. With the consistency stage a tenant reveals nothing unless the threshold of the
    phase's participants signed the very view it was shown."""
    if not defended:
        monkeypatch.setattr(sharing_views, "view_signers", lambda *args: 99)
    grid = ForgingGrid(make_client_app(SECURE), 4, dealer=tmp_path / "dealer", sharing_keys=tmp_path / "share",
                       node_config={"share-min-tenants": 3})  # views of 3 alive pass the tenants' own checks
    strategy = _trained(grid)
    report = SecAggSharing("secure", "all", 0.5, 120.0)(strategy, grid, 1, sorted(strategy.tenant_of.values()))
    assert sorted(grid.unmask_replies) == [1, 2, 3, 4] and report.threshold == 3
    revealed = [n for n, reply in grid.unmask_replies.items() if not reply.has_error()]
    assert report.tenants == []  # no aggregate either way (Flower's honest unmask cannot combine these)
    if defended:
        assert revealed == []
        assert all("1 participants signed this view" in r.error.reason for r in grid.unmask_replies.values())
    else:  # each tenant reveals key shares under its own view: what the review's attack needs
        assert revealed == [1, 2, 3, 4]


def test_no_phase_after_a_missed_load_and_no_load_without_a_phase(task_identity: None, tmp_path) -> None:
    """The review's null-step differencing needs the tenants to skip a load (their parameters then
    stay what the last aggregate summed); its final-model overwrite needs a load with no phase."""
    grid = SybilGrid(make_client_app(SECURE), tmp_path, node_config={"allow-unpinned-sharing": True})
    strategy = _trained(grid)
    victim = grid.contexts[VICTIM]
    load = Message(RecordDict({"config": ConfigRecord({"share": "all", "share-count": 2}),
                               "shared": ArrayRecord({n: Array(np.zeros(tuple(s), dtype=np.int64)) for n, s in zip(
                                   NAMES, [strategy.cloud.export_halves(strategy.tenant_of[VICTIM])[n].shape
                                           for n in NAMES])})}),
                   dst_node_id=VICTIM, message_type="train.share_load", group_id="1")
    assert "no phase waiting" in grid.deliver(load).error.reason  # trained, never shared: nothing to load
    assert VICTIM in _sybil_phase(grid, strategy, 1).included  # the cloud sends it no load afterwards
    assert "an aggregate of 2 tenants, 4 were alive" in grid.deliver(load).error.reason  # not this phase's count
    note_training_begin(victim, 2)  # round 2 trains (as the training handlers note it)
    note_training_step(victim)
    assert VICTIM not in _sybil_phase(grid, strategy, 2).included
    assert "no phase waiting" in grid.deliver(load).error.reason  # a load after training resumed: refused


class ReplayGrid(LocalGrid):
    """An honest phase, except that the victim's share-keys message comes again after it signed
    its view (the second review's way to wipe the signed view and have a second one signed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept: Message | None = None
        self.replayed: Message | None = None

    def deliver(self, message: Message) -> Message | None:
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if message.metadata.dst_node_id == VICTIM and stage == Stage.SHARE_KEYS:
            self.kept = copy.deepcopy(message)
        if message.metadata.dst_node_id == VICTIM and stage == Stage.UNMASK:
            self.replayed = super().deliver(copy.deepcopy(self.kept))
        return super().deliver(message)


def test_a_replayed_stage_changes_nothing(task_identity: None, tmp_path) -> None:
    grid = ReplayGrid(make_client_app(SECURE), 4, dealer=tmp_path / "dealer", sharing_keys=tmp_path / "share")
    strategy = _trained(grid)
    report = SecAggSharing("secure", "all", 0.5, 120.0)(strategy, grid, 1, sorted(strategy.tenant_of.values()))
    assert grid.replayed is not None and "expect unmask stage" in grid.replayed.error.reason
    assert report.tenants == ["tenant-0", "tenant-1", "tenant-2", "tenant-3"]  # the victim's view stood


# -- two live copies of a tenant in one phase (the tenth session's review) ----------------------

def _post_collect(context: Context, node: int, participants: list[int]) -> None:
    """What a tenant holds after its collect stage of a phase (Flower's SecAgg+ secrets, the phase's
    signers, the ledger's shared round)."""
    state = SecAggPlusState(current_stage=Stage.COLLECT_MASKED_VECTORS, nid=node, sample_num=len(participants),
                            share_num=len(participants), threshold=3, sk1=b"phase secret sk1", sk2=b"sk2",
                            rd_seed=b"mask seed",
                            public_keys_dict={n: [bytes([n]) * 32, bytes([n + 100]) * 32] for n in participants})
    context.state[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
    context.state[sharing_views.PHASE_STATE] = ConfigRecord({"signer-ids": participants[1:],
                                                             "signer-keys": [b"k"] * (len(participants) - 1)})
    context.state["sharing-policy"] = ConfigRecord({"round": 1, "trained": 0, "shared": 1, "loaded": 0,
                                                    "unmasked": 0, "alive": 0})


@pytest.mark.parametrize("defended", [False, True])
@pytest.mark.parametrize("how", ["second-run-same-session", "restart"])
def test_a_second_copy_of_a_tenant_cannot_sign_a_second_view(defended: bool, how: str, task_identity: None,
                                                             tmp_path) -> None:
    """A message handled between collect and consistency mirrors the node's state. If the mirror
    held the phase's secrets, a second copy of the tenant (a second run of the same session, or the
    node restarted after it signed) would load them and sign another view of the same phase: the
    victim alive to one copy (its mask seed's shares revealed) and dropped to the other (its key's
    shares revealed) opens its vector. The phase's records are never mirrored."""
    from flower_split.flower import tenant as tenant_module
    from flower_split.flower.node_state import mirrored, node_state_dir
    from flower_split.flower.settings import settings_from_run_config
    config = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 8, "tail-bottleneck": 16,
              "batch-size": 16, "max-train-samples": 128, "max-test-samples": 64, "local-steps": 2,
              "num-server-rounds": 3, "eval-every": 0, "global-eval": False, "min-nodes": 2, "reply-timeout": 120.0,
              "share": "tail", "session": "s"}  # run config: the cloud names the session
    node_config = {"state-dir": str(tmp_path / "nodes"), "share-min-tenants": 3, "allow-unpinned-sharing": True,
                   "partition-id": 0, "num-partitions": 4}
    participants = [1, 2, 3, 4]
    app = make_client_app(config)
    first = Context(run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config={})
    _post_collect(first, 1, participants)
    transient = tenant_module.TRANSIENT_RECORDS if defended else frozenset()
    with mirrored(first, node_state_dir(first, settings_from_run_config(config)[1], "tenant-0"),
                  {"role": "tenant", "tenant": "tenant-0"}, transient):
        pass  # what tenant.handle does for any message handled between collect and consistency

    def consistency(context: Context, alive: list[int], dropped: list[int]) -> Message:
        configs = ConfigRecord({Key.STAGE: CONSISTENCY_STAGE, Key.ACTIVE_NODE_ID_LIST: alive,
                                Key.DEAD_NODE_ID_LIST: dropped})
        return app(Message(content=RecordDict({RECORD_KEY_CONFIGS: configs}), dst_node_id=1, message_type="train",
                           group_id="phase-1"), context)

    assert not consistency(first, participants, []).has_error()  # copy 1 signs: tenant 4 alive
    if how == "restart":
        second = first
        for key in list(second.state.keys()):
            del second.state[key]
    else:
        second = Context(run_id=2, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config={})
    reply = consistency(second, [1, 2, 3], [4])  # copy 2 asked to sign: tenant 4 dropped
    if defended:
        assert reply.has_error() and RECORD_KEY_STATE not in second.state
    else:
        assert not reply.has_error() and second.state[RECORD_KEY_STATE]["sk1"] == b"phase secret sk1"


# -- a known half shared again (the twenty-first session's review, M1) ---------------------------

def _load_known_half(grid: LocalGrid, strategy: SecureSplitStrategy, count: int) -> dict[str, torch.Tensor]:
    """The phase's load with a sum the cloud chose (zero): the victim's new half is then one the
    cloud knows; the cloud's own new half keeps the victim's model as it was. Returns the known half."""
    tenant = strategy.tenant_of[VICTIM]
    state = grid.contexts[VICTIM].state
    old = records_to_state(state["secure.arrays"], state["secure.config"])["halves"]["weights"]
    cloud = strategy.cloud.export_halves(tenant)
    shapes = {n: tuple(cloud[n].shape) for n in NAMES}
    load = Message(RecordDict({"config": ConfigRecord({"share": "all", "share-count": count, "share-loads": 1}),
                               "shared": ArrayRecord({n: Array(np.zeros(shapes[n], dtype=np.int64)) for n in NAMES})}),
                   dst_node_id=VICTIM, message_type="train.share_load", group_id="1")
    reply = grid.deliver(load)
    assert not reply.has_error(), reply.error.reason
    known = records_to_state(state["secure.arrays"], state["secure.config"])["halves"]["weights"]
    assert all(not bool(known[n].any()) for n in NAMES)  # -floor(-0 / n) = 0: the cloud knows it
    strategy.cloud.tenants[tenant].offer_load({n: old[n] + cloud[n] for n in NAMES})  # completed at the next begin
    return {n: known[n] for n in NAMES}


@pytest.mark.parametrize("how", ["undone", "past the schedule"])
@pytest.mark.parametrize("defended", [False, True])
def test_a_tenant_whose_halves_did_not_change_since_the_load_does_not_share_the_known_half(
        defended: bool, how: str, task_identity: None, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a load the cloud knows each tenant's half of the mean. A cloud that makes the steps
    since change nothing would get that half back in the next phase from each tenant but one, and
    the last one's half by subtraction: by undoing them (its rollback, at an evaluation begin that
    reports lower update counts: the first review), or by running them past the end of the
    tenant's learning-rate schedule, where the rate encodes to 0 (the second review). The phase
    here is the unpinned sybil one, only to read what the victim sends."""
    if not defended:
        monkeypatch.setattr(sharing_client, "check_changed_since_load", lambda *args: None)
    grid = SybilGrid(make_client_app({**SECURE, "num-server-rounds": 3}), tmp_path,
                     node_config={"allow-unpinned-sharing": True})
    _, body = split_encoder(load_encoder("tiny", seed=0))
    steps = 3 if how == "past the schedule" else 1  # 3 rounds of 1 step: the schedule is 3 updates long
    strategy = SecureSplitStrategy(SecureCloudParty(body, None), NodeDealer(120.0), local_steps=steps,
                                   reply_timeout=120.0, global_eval=False)
    strategy.start(grid, 1, eval_every=0, on_report=lambda report: None)
    assert VICTIM in _sybil_phase(grid, strategy, 1).included
    known = _load_known_half(grid, strategy, 1 + len(SYBILS))
    strategy.local_steps = 1
    strategy.start(grid, 2, eval_every=0, first_round=2, on_report=lambda report: None)  # round 2: one real step
    tenant = strategy.tenant_of[VICTIM]
    assert strategy.cloud.counts(tenant)["loads"] == 1 and strategy.cloud.counts(tenant)["tail"] == steps + 1
    if how == "undone":
        assert strategy.cloud.abort_step(tenant, undo_previous=True)  # the cloud undoes round 2's step ...
        strategy.evaluate(grid, 2)  # ... and the victim follows at the evaluation's begin
    collect = _sybil_phase(grid, strategy, 2)
    if defended:
        assert VICTIM not in collect.included
        return
    residues = [t.numpy() for t in (decode_sum(a, 1 + len(SYBILS)) for a in collect.aggregate)]
    sent = {n: lift_tenant_sum(torch.from_numpy(r.astype(np.int64)), strategy.cloud.export_halves(tenant)[n])
            for n, r in zip(NAMES, residues)}
    assert all(torch.equal(sent[n], known[n]) for n in NAMES)  # exactly the half the cloud made known
