"""The tenant's own rules for a sharing phase (Flower's SecAgg+ stages), which the cloud cannot relax.

Hostile reviews opened one tenant's adapter and classifier bit-exactly with phases the cloud
forged (the victim alone; sybils; a different story of who dropped to each tenant; a partial
list of neighbours; a replayed stage). Flower's ``secaggplus_mod`` does what the server's
stages ask; :func:`sharing_policy_mod` (a Flower mod around it) checks each stage first, in
Flower's stage order and for the node that set the phase up, before it writes any state:

* **set-up**: the run shares, from secret start weights, on a node that is not ``private``;
  SecAgg+'s quantization is the mode's own (weight 1); at least ``share-min-tenants``
  participants (node config, default 4) and a threshold above half of them; the set-up names
  the full-entropy mask generator (:mod:`~flower_split.flower.secagg_prg`) and it is installed.
* **share keys**: one key pair per participant set up; every other participant's keys signed
  by a distinct pinned tenant (:mod:`~flower_split.flower.sharing_keys`), unless the node
  allows unpinned sharing (then the guarantee is against a semi-honest cloud only).
* **collect**: key shares from every other participant, each once (a pairwise mask with each);
  the phase's round is the tenant's current training round, later than the last one it shared;
  a training step finished since; the last phase's aggregate reached it (two aggregates over
  sets that differ by one tenant, with the others' parameters unchanged in between, would give
  that tenant's vector); with a :data:`~flower_split.flower.sharing_params.FINE_TUNED_COPY`
  scope, not the run's last round.
* **consistency** and **unmask**: one signed view per phase, the threshold's signatures over it
  (:mod:`~flower_split.flower.sharing_views`).
* **load** (:func:`note_load`): one per phase, right after the tenant's own unmask stage of it,
  over the tenants alive there, before any step begins (secure: a begin reports the tenant's
  load count, and a cloud that read the old one has dropped the load it sent).
* **secure collect** (:func:`check_changed_since_load`, from the collect handler, which holds the
  tenant's halves): no step in flight, and every shared half of a trained group (the tail and
  classifier; the head too when it trains) differs from the one the last load gave it (SHA-256
  of its bytes, :data:`LOADED_DIGESTS`). Right after a load the cloud knows the tenant's half of
  the mean; a cloud that undid every step since (its rollback of up to two steps) or ran steps
  whose learning rate encodes to 0 (past the schedule's end) would otherwise get that known half
  back from every tenant but one, and the last one's by subtraction (docs/secure.md §10).

The ledger lives in ``context.state`` under :data:`POLICY_STATE` (the step handlers write
it through :func:`note_training_begin` / :func:`note_training_step` / :func:`note_begin`). docs/secure.md §10 has
the reasons and the attacks, each a test.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flwr.app import ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from flower_split.config import RunConfig
from flower_split.flower.contract import ConfigKey, RecordKey
from flower_split.flower.dealer_node import TENANT_ROLE, node_role
from flower_split.flower.node_privacy import check_private
from flower_split.flower.records import config_value
from flower_split.flower.settings import FlowerSettings, settings_from_run_config
from flower_split.flower.secagg_prg import PRG_NAME, installed
from flower_split.flower.sharing_keys import SharingIdentity, sharing_identity, sign_keys, verify_peers
from flower_split.flower.sharing_params import FINE_TUNED_COPY, quantization
from flower_split.flower.sharing_views import (
    CONSISTENCY_STAGE, check_order, check_unmask, consistency, end_phase, flower_state, note_signers, start_phase,
)
from flower_split.protocol import ProtocolError

POLICY_STATE = "sharing-policy"  # ConfigRecord {round, trained, shared, loaded, unmasked, alive, begun}
LOADED_DIGESTS = "sharing-loaded"  # ConfigRecord {parameter name: SHA-256 of the half the last load gave}
MIN_TENANTS_CONFIG = "share-min-tenants"
DEFAULT_MIN_TENANTS = 4
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def min_tenants(node_config: Mapping[str, Any]) -> int:
    """The node's floor on a phase's participants (node config ``share-min-tenants``, >= 2)."""
    value = node_config.get(MIN_TENANTS_CONFIG, DEFAULT_MIN_TENANTS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ProtocolError(f"node config {MIN_TENANTS_CONFIG}: expected an integer >= 2, got {value!r}")
    return value


def _progress(context: Context) -> dict[str, int]:
    record = context.state.get(POLICY_STATE)
    values = {"round": 0, "trained": 0, "shared": 0, "loaded": 0, "unmasked": 0, "alive": 0, "begun": 0}
    if isinstance(record, ConfigRecord):
        values.update({k: int(v) for k, v in record.items() if k in values})
    return values


def _store(context: Context, values: dict[str, int]) -> None:
    context.state[POLICY_STATE] = ConfigRecord(dict(values))


def note_training_begin(context: Context, server_round: int) -> None:
    """A training step of ``server_round`` begins (the round a sharing phase may next be for)."""
    values = _progress(context)
    values["round"] = server_round
    _store(context, values)


def note_begin(context: Context) -> None:
    """A secure begin of any kind answered with this tenant's counts: no load after it."""
    values = _progress(context)
    values["begun"] = 1
    _store(context, values)


def note_loaded_halves(context: Context, digests: dict[str, str]) -> None:
    """Secure: the SHA-256 of each half a load just gave (:func:`check_changed_since_load`)."""
    context.state[LOADED_DIGESTS] = ConfigRecord(dict(digests))


def check_changed_since_load(context: Context, digests: dict[str, str], in_flight: bool) -> None:
    """Secure collect: no step in flight, and none of the halves in ``digests`` (name: SHA-256,
    the trained groups' shared halves now) is the one the last load gave; ProtocolError otherwise."""
    if in_flight:
        raise ProtocolError("sharing: a step is in flight; this tenant shares finished steps only; refused")
    loaded = context.state.get(LOADED_DIGESTS)
    same = sorted(name for name, digest in digests.items() if isinstance(loaded, ConfigRecord)
                  and loaded.get(name) == digest)
    if same:
        raise ProtocolError(f"sharing: {', '.join(same)} unchanged since the last load (its steps undone, or a learning "
                            "rate of 0): the cloud knows these halves; refused")


def note_training_step(context: Context, steps: int = 1) -> None:
    """``steps`` training steps finished (the adapters changed since the last phase)."""
    values = _progress(context)
    values["trained"] += steps
    _store(context, values)


def note_load(context: Context, count: int) -> None:
    """The aggregate of ``count`` tenants is about to be loaded: one load per phase, only right
    after the tenant's own unmask stage of it and over the tenants alive there (a load at any
    other time would be the cloud's choice of its parameters); ProtocolError otherwise."""
    values = _progress(context)
    if (values["shared"] <= values["loaded"] or values["unmasked"] != values["shared"] or values["trained"]
            or values["begun"]):
        raise ProtocolError("sharing: an aggregate to load, but this tenant has no phase waiting for one "
                            f"(last shared in round {values['shared']}, loaded round {values['loaded']}); refused")
    if count != values["alive"]:
        raise ProtocolError(f"sharing: an aggregate of {count} tenants, {values['alive']} were alive in the phase; "
                            "refused")
    _store(context, {**values, "loaded": values["shared"]})


def _note_unmask(context: Context, alive: int) -> None:
    values = _progress(context)
    _store(context, {**values, "unmasked": values["shared"], "alive": alive})


def _check_setup(configs: ConfigRecord, config: RunConfig, settings: FlowerSettings, floor: int) -> None:
    if settings.share == "none":
        raise ProtocolError("sharing: this run does not share (share = none); refused")
    if config.insecure_reproducible_init:
        raise ProtocolError("sharing: the run starts from public weights (insecure-reproducible-init); another run "
                            "from the same weights would differ from this one's aggregate by this tenant; refused")
    q = quantization(config.security)
    expected = {Key.CLIPPING_RANGE: q.clipping_range, Key.TARGET_RANGE: q.quantization_range,
                Key.MOD_RANGE: q.modulus_range, Key.MAX_WEIGHT: 1.0}
    differ = {k: configs.get(k) for k, v in expected.items() if configs.get(k) != v}
    if differ:
        raise ProtocolError(f"sharing: SecAgg+ set-up {differ}, expected {expected} (the {config.security} "
                            "mode's quantization, weight 1); refused")
    share_num, threshold = int(configs.get(Key.SHARE_NUMBER, 0)), int(configs.get(Key.THRESHOLD, 0))
    if share_num < floor or int(configs.get(Key.SAMPLE_NUMBER, 0)) < share_num:
        raise ProtocolError(f"sharing: {share_num} participants, this tenant shares with at least {floor} "
                            f"(node config {MIN_TENANTS_CONFIG}); refused")
    if not share_num / 2 < threshold <= share_num:
        raise ProtocolError(f"sharing: threshold {threshold} of {share_num}; this tenant needs more than half "
                            "(else the cloud could gather both of its seeds' shares); refused")


def _check_collect(message: Message, context: Context, configs: ConfigRecord, settings: FlowerSettings,
                   node_id: int) -> None:
    sources, participants = configs.get(Key.SOURCE_LIST, []), set(flower_state(context).public_keys_dict)
    if not isinstance(sources, list) or len(set(sources)) != len(sources) or set(sources) != participants - {node_id}:
        raise ProtocolError(f"sharing: key shares from {sources!r}; this tenant masks with every other participant "
                            f"of the key exchange ({sorted(participants - {node_id})}), each once; refused")
    record = message.content.config_records.get(RecordKey.FIT_CONFIG)
    if record is None:
        raise ProtocolError(f"sharing: the collect stage carries no {RecordKey.FIT_CONFIG} record")
    server_round = config_value(record, ConfigKey.SERVER_ROUND, int)
    values = _progress(context)
    if server_round != values["round"] or server_round <= values["shared"]:
        raise ProtocolError(f"sharing: a phase for round {server_round}; this tenant trains in round "
                            f"{values['round']} and last shared in round {values['shared']} (one phase per round, "
                            "after training); refused")
    if values["trained"] < 1:
        raise ProtocolError("sharing: no training step finished since this tenant's last phase; refused")
    if values["loaded"] < values["shared"]:
        raise ProtocolError(f"sharing: the aggregate of this tenant's last phase (round {values['shared']}) never "
                            "reached it; refused (with the others' parameters unchanged, the next aggregate would "
                            "differ from that one by this tenant)")
    if settings.share in FINE_TUNED_COPY and server_round >= settings.num_server_rounds:
        raise ProtocolError(f"sharing: round {server_round} is the run's last; with share = {settings.share!r} "
                            "each tenant keeps its fine-tuned copy; refused")
    _store(context, {**values, "trained": 0, "begun": 0, "shared": server_round})  # before anything leaves the node


def sharing_policy_mod(overrides: Mapping[str, Any]) -> Mod:
    """The mod that applies this module's rules around Flower's ``secaggplus_mod``
    (``overrides``: run-config values that take precedence, as for the handlers)."""

    def mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        config, settings = settings_from_run_config({**dict(context.run_config), **overrides})
        if node_role(context.node_config, settings) != TENANT_ROLE:
            raise ProtocolError("sharing: SecAgg+ stage sent to the dealer node, which serves no tenant")
        # a private node shares nothing (share = "none" is part of PRIVATE_FLOWER at every level);
        # the level's own requirements are its handlers' to check, and would only blur the reason
        check_private(context.node_config, config, settings, required={})
        identity = sharing_identity(context.node_config)
        floor = min_tenants(context.node_config)
        node_id = check_order(message, context, stage)  # before anything here writes state
        if stage == CONSISTENCY_STAGE:
            return consistency(message, context, identity, floor)
        if stage == Stage.SETUP:
            _check_setup(configs, config, settings, floor)
            prg = message.content.config_records.get(RecordKey.SHARE_PRG, {}).get("prg")
            if prg != PRG_NAME or not installed():
                raise ProtocolError(f"sharing: the set-up names mask generator {prg!r}, this tenant masks with "
                                    f"{PRG_NAME!r} (Flower's own keeps 32 bits of a seed); refused")
        elif stage == Stage.SHARE_KEYS:
            note_signers(context, _check_keys(message, context, configs, identity, floor, node_id))
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            _check_collect(message, context, configs, settings, node_id)
        elif stage == Stage.UNMASK:
            _note_unmask(context, check_unmask(message, context, identity, floor))
        reply = call_next(message, context)
        if stage == Stage.SETUP and not reply.has_error():
            start_phase(context)
            reply_configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            signed = sign_keys(identity, context.run_id, node_id, reply_configs[Key.PUBLIC_KEY_1],
                               reply_configs[Key.PUBLIC_KEY_2])
            if signed is not None:
                reply.content.config_records[RecordKey.SHARE_SIGNATURE] = ConfigRecord({"signed": signed})
        if stage == Stage.UNMASK:
            end_phase(context)
        return reply

    return mod


def _check_keys(message: Message, context: Context, configs: ConfigRecord, identity: SharingIdentity,
                floor: int, node_id: int) -> dict[int, bytes]:
    keys = {k: v for k, v in configs.items() if k != Key.STAGE}
    share_num = flower_state(context).share_num
    if len(keys) != share_num or len(keys) < floor:
        raise ProtocolError(f"sharing: {len(keys)} participants' keys, set up for {share_num} (at least {floor}); "
                            "refused")
    signatures = message.content.config_records.get(RecordKey.SHARE_SIGNATURES)
    return verify_peers(identity, context.run_id, node_id, keys, signatures)
