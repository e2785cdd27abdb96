"""One view of who survived a sharing phase: the consistency stage before SecAgg+'s unmask.

Flower's SecAgg+ is secure against a semi-honest server; a malicious one tells each tenant a
different story at the unmask stage (a hostile review, 2026-12-03): the victim's neighbours
are "dropped" to the others, who reveal those neighbours' key shares, while the victim is
"alive" to everyone, who reveal its mask seed: the victim's vector alone, bit-exactly.
Bonawitz et al.'s malicious-server answer is a consistency round, added here between the
collect and unmask stages (the cloud's side runs it: :mod:`~flower_split.flower.sharing_server`):

* **consistency** (``train``, stage :data:`CONSISTENCY_STAGE`): the tenant is shown the
  lists it will be asked to unmask under. It checks them on its own (distinct ids, together
  exactly the phase's participants, itself alive, at least the threshold alive), signs
  ``(run id, every participant's SecAgg+ keys, alive, dropped)`` with its sharing key and keeps
  the view: one per phase, never a second one.
* **unmask**: the lists must be that view, and (pinned tenants) signed by at least the
  threshold of the phase's participants, each under the key that signed its SecAgg+ keys.
  Honest tenants sign one view each, so two views cannot both gather the threshold when it is
  more than half of them: every tenant that reveals a share reveals it under the same view.

The phase's signers and view live in ``context.state`` under :data:`PHASE_STATE`, cleared at
every set-up and after the unmask stage.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, check_stage
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from flower_split.flower.contract import RecordKey
from flower_split.flower.sharing_keys import SharingIdentity, sign_view, view_digest, view_signers
from flower_split.protocol import ProtocolError

CONSISTENCY_STAGE = "flower-split.consistency"
PHASE_STATE = "sharing-phase"  # ConfigRecord {signer-ids, signer-keys, view}


def flower_state(context: Context) -> SecAggPlusState:
    """Flower's SecAgg+ state of this node's current phase (an empty one before any set-up)."""
    record = context.state.config_records.get(RECORD_KEY_STATE)
    return SecAggPlusState(**dict(record)) if record is not None else SecAggPlusState()


def start_phase(context: Context) -> None:
    """A new set-up: forget the previous phase's signers and view."""
    context.state.config_records.pop(PHASE_STATE, None)


def end_phase(context: Context) -> None:
    """After the unmask stage: drop this phase's record and Flower's secrets (key pair, seed, shares)."""
    context.state.config_records.pop(PHASE_STATE, None)
    context.state.config_records.pop(RECORD_KEY_STATE, None)


def check_order(message: Message, context: Context, stage: Any) -> int:
    """Flower's stage order (the consistency stage only right after collect), checked before this
    project's mod writes any state; and the message is for the node that set the phase up. The
    node's id (the phase's, once set up)."""
    flower = flower_state(context)
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if stage == CONSISTENCY_STAGE:
        if flower.current_stage != Stage.COLLECT_MASKED_VECTORS:
            raise ProtocolError("sharing: a consistency stage before this tenant sent its vector; refused")
    elif configs is not None:
        check_stage(flower.current_stage, configs)  # a replayed stage would otherwise rewrite the phase's record
    if stage != Stage.SETUP and message.metadata.dst_node_id != flower.nid:
        raise ProtocolError(f"sharing: a message for node {message.metadata.dst_node_id}, the phase was set up by "
                            f"node {flower.nid}; refused")
    return flower.nid if stage != Stage.SETUP else message.metadata.dst_node_id


def note_signers(context: Context, signers: dict[int, bytes]) -> None:
    """The participants' signing keys, as verified in the share-keys stage (once per phase)."""
    if PHASE_STATE in context.state:
        raise ProtocolError("sharing: a second key exchange in one phase; refused")
    context.state[PHASE_STATE] = ConfigRecord({"signer-ids": list(signers), "signer-keys": list(signers.values())})


def _lists(configs: ConfigRecord) -> tuple[list[int], list[int]]:
    alive, dropped = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
    if not (isinstance(alive, list) and isinstance(dropped, list)
            and all(isinstance(n, int) and not isinstance(n, bool) for n in alive + dropped)):
        raise ProtocolError("sharing: the node lists are malformed; refused")
    return alive, dropped


def check_view(alive: list[int], dropped: list[int], node_id: int, state: SecAggPlusState, floor: int) -> None:
    """A tenant's own checks of a view: distinct ids that make up exactly the phase's
    participants, itself alive, at least the threshold and the tenant's floor alive (the
    aggregate sums the alive tenants)."""
    participants = set(state.public_keys_dict)
    if len(set(alive)) != len(alive) or len(set(dropped)) != len(dropped) or set(alive) & set(dropped):
        raise ProtocolError("sharing: a node named twice, or both alive and dropped; refused")
    if set(alive) | set(dropped) != participants:
        raise ProtocolError("sharing: the lists do not make up the phase's participants; refused")
    if node_id not in alive:
        raise ProtocolError("sharing: this tenant is named dropped after it sent its vector; refused")
    if len(alive) < max(state.threshold, floor):
        raise ProtocolError(f"sharing: {len(alive)} alive, below the threshold {state.threshold} or this tenant's "
                            f"floor {floor}; refused")


def consistency(message: Message, context: Context, identity: SharingIdentity, floor: int) -> Message:
    """The consistency stage: check the view, keep it (one per phase) and sign it."""
    state = flower_state(context)
    alive, dropped = _lists(message.content.config_records[RECORD_KEY_CONFIGS])
    check_view(alive, dropped, state.nid, state, floor)
    phase = context.state.get(PHASE_STATE)
    if not isinstance(phase, ConfigRecord):
        raise ProtocolError("sharing: no key exchange of this phase on record; refused")
    digest = view_digest(context.run_id, state.public_keys_dict, alive, dropped)
    if "view" in phase and phase["view"] != digest:
        raise ProtocolError("sharing: a second, different view of this phase; refused (one view per phase)")
    context.state[PHASE_STATE] = ConfigRecord({**dict(phase), "view": digest})
    signed = sign_view(identity, digest)
    content = RecordDict({RecordKey.SHARE_VIEW: ConfigRecord({"signed": signed} if signed is not None else {})})
    return Message(content, reply_to=message)


def check_unmask(message: Message, context: Context, identity: SharingIdentity, floor: int) -> int:
    """The unmask stage: the lists are the view this tenant signed, and (pinned) the threshold of
    the phase's participants signed it too; how many are alive in it."""
    state = flower_state(context)
    alive, dropped = _lists(message.content.config_records[RECORD_KEY_CONFIGS])
    check_view(alive, dropped, state.nid, state, floor)
    phase = context.state.get(PHASE_STATE)
    digest = view_digest(context.run_id, state.public_keys_dict, alive, dropped)
    if not isinstance(phase, ConfigRecord) or phase.get("view") != digest:
        raise ProtocolError("sharing: the unmask lists are not the view this tenant signed in the consistency "
                            "stage; refused")
    if identity.peers is None:
        return len(alive)  # unpinned: a semi-honest cloud is trusted, no signatures to count
    signers: dict[int, Any] = dict(zip(phase.get("signer-ids", []), phase.get("signer-keys", [])))
    count = view_signers(signers, digest, message.content.config_records.get(RecordKey.SHARE_VIEWS))
    if count < state.threshold:
        raise ProtocolError(f"sharing: {count} participants signed this view, the threshold is {state.threshold} "
                            "(another view may be going round); refused")
    return len(alive)
