"""Tenant-side handlers of split-secure: one function per message type (see :data:`HANDLERS`).

The tenant is party 1 of the 2PC (:class:`SecureClientParty`); the cloud's strategy
(:class:`flower_split.flower.secure_strategy.SecureSplitStrategy`) drives one secure step per tenant at
a time, all tenants in the same Flower round trip. Message types:

``train.secure_setup``     server: the dealer's hello for this tenant. Client: verify its
                           signature under the pinned dealer key (node config
                           ``dealer-public-key``; unpinned only if the tenant's own node config
                           says ``allow-unpinned-dealer``, never the run config),
                           new party (its halves, dealer key, CKKS keys in ``he`` mode) -> its
                           :class:`ClientSetup`.
``train.secure_begin``     server: ``config`` {head-updates, tail-updates, share-loads} (the cloud's
                           update and sharing-load counts), {next-step} (the lowest step number
                           the cloud accepts),
                           {ahead-step, ahead-shape} (only while the cloud holds material dealt
                           ahead: its number and [batch, tokens, rows]; a step that cannot use it, an
                           evaluation or another shape, moves past that number) and, in ``he``
                           mode, {he-key-id} (the cloud's CKKS key id).
                           Client: reconcile (abort a step in flight, undo a step the cloud did
                           not complete; refuse a load count other than its own or one fewer,
                           a load whose ack was lost, which the cloud completes), switch to a
                           rotated key the cloud now holds, next training batch -> first step message (refused, before anything is
                           opened, if its step number is below next-step), ``sync``
                           {head-updates, tail-updates, share-loads}. A tenant whose own mean loss of an
                           earlier round reached its ``target-loss`` sends no step but
                           ``metrics`` {stopped: that round} (:mod:`~flower_split.flower.stop_rule`).
``evaluate.secure_begin``  the same for the next test batch (``config`` also {restart, scope}),
                           or no message when the test set is done; ``metrics`` {remaining}.
``train.secure_rekey``     (``he`` only) server: ``config`` {he-key-id}. Client: switch to a pending
                           key the cloud holds, then a new CKKS key pair (or the still pending one
                           again), kept pending until a later message reports the cloud holding
                           it -> ``rekey`` (:class:`KeyRotation`: the new public context).
``train.secure_resume``    server (a cloud resumed from its checkpoint): ``resume`` {ephemeral,
                           nonce}. Client: ``resume`` {proof}, an HMAC only the holder of the
                           tenant's X25519 key can make (:mod:`~flower_split.protocol.resume_proof`).
``*.secure_next``          server: the cloud's next step message. Client: its reply, or none
                           when the step ends here; once the step is over ``metrics``
                           {done: 1, and with ``secure-metrics``: num-examples (training) or
                           correct/num-examples/tp/fp/fn (evaluation)}. Never a training loss:
                           in ``he`` mode it is a decrypted CKKS value (each one given back is
                           an equation in the tenant's secret key); no mode reports one
                           (docs/secure.md §9).

``context.state``: ``secure.arrays`` / ``secure.config`` (the party's state: its secrets —
halves, dealer key, CKKS secret keys — never leave the node), ``secure.batch`` (size of the
batch in flight), ``secure.labels`` (an evaluation batch's labels) and the data cursors of
the plain app (``data``). A long-lived process keeps each party live between its messages
(:data:`PARTIES`); the state is still written in full by every message.
"""

from __future__ import annotations

import weakref

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flower_split.config import RunConfig
from flower_split.flower.contract import ConfigKey, MessageType, MetricKey, RecordKey
from flower_split.flower.records import config_value, read_config, read_record, tensor_to_array
from flower_split.flower.context_state import ArrayMemo, records_to_state, state_tensor, state_to_records
from flower_split.flower.secure_records import (
    pack_key_rotation, pack_secure, pack_setup, unpack_hello, unpack_secure,
)
from flower_split.flower.dealer_node import allow_unpinned, pinned_dealer
from flower_split.flower.settings import FlowerSettings
from flower_split.flower.sharing_policy import note_begin, note_training_begin, note_training_step
from flower_split.flower.stop_rule import note_loss, stop_rule
from flower_split.flower.tenant import (
    Cursor, Handler, TenantData, eval_set, new_adapters, next_batch_shape, randomized_labels, train_batches,
)
from flower_split.flower.node_privacy import node_input_noise
from flower_split.flower.party_cache import PartyCache
from flower_split.flower.node_state import node_state_dir
from flower_split.flower.state_spill import SPILL_CONFIG, references, spill_dir, spill_store
from flower_split.flower.node_predict import PREDICT_SCOPE, append_predictions, note_scope, predicting, start_output
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_client import SecureClientParty, SecureStepResult
from flower_split.train.metrics import class_counts

NEW_SETUP_CONFIG = "allow-new-setup"  # node config: a set-up may replace a trained party
SECURE_ARRAYS, SECURE_CONFIG, SECURE_BATCH, SECURE_LABELS = "secure.arrays", "secure.config", "secure.batch", "secure.labels"


def _new_party(data: TenantData, config: RunConfig, settings: FlowerSettings, context: Context) -> SecureClientParty:
    head, tail = new_adapters(data, config)
    party = SecureClientParty(data.tenant, data.embedder, head, tail, config, settings.total_steps)
    party.input_noise = node_input_noise(context.node_config, config, settings, data.embedder)
    return party


PARTIES: PartyCache[SecureClientParty] = PartyCache()
"""This process's live parties (:mod:`~flower_split.flower.party_cache`)."""
_MEMOS: weakref.WeakKeyDictionary[SecureClientParty, ArrayMemo] = weakref.WeakKeyDictionary()
"""Each party's Arrays of its last save (:data:`~flower_split.flower.context_state.ArrayMemo`), as long
as the party lives: a save copies only the tensors that changed since."""
LIVE_TOKEN = "live-token"  # in SECURE_CONFIG: the token of the live party this state was saved from
SPILL_GENERATION = "spill-generation"  # in SECURE_CONFIG: the generation of its spilled files


def _party_key(context: Context, data: TenantData, config: RunConfig, settings: FlowerSettings) -> tuple:
    """What a party was built from: a live party serves only a message of the same key (the
    same run, too: a tenant's new save drops its older live party, and two runs must not)."""
    return context.run_id, data.tenant, config, settings, dict(context.node_config)


def _load(context: Context, data: TenantData, config: RunConfig, settings: FlowerSettings) -> SecureClientParty:
    """The tenant's party: the live one this state was saved from, or decoded from the state.
    (The live one leaves the cache: it returns only with the next :func:`_save`.)"""
    arrays, meta = context.state.get(SECURE_ARRAYS), context.state.get(SECURE_CONFIG)
    if arrays is None or meta is None:
        raise ProtocolError(f"tenant {data.tenant!r}: not set up for secure mode (train.secure_setup first)")
    directory = spill_dir(context, mirrored=False)
    if directory is not None:
        spill_store(directory).hold(arrays, int(meta.get(SPILL_GENERATION, 0)))
    live = PARTIES.take(meta.get(LIVE_TOKEN), _party_key(context, data, config, settings))
    if live is not None:
        return live
    if references(arrays):
        if directory is None:
            raise ProtocolError(f"tenant {data.tenant!r}: the state lies in {SPILL_CONFIG} files and this node "
                                f"has no {SPILL_CONFIG} directory")
        arrays = spill_store(directory).unspill(arrays)
    party = _new_party(data, config, settings, context)
    try:
        party.load_state_dict(records_to_state(arrays, meta))
    except ValueError as exc:
        raise ProtocolError(f"secure state does not fit this run: {exc}") from exc
    return party


def _put_back(context: Context, party: SecureClientParty, data: TenantData, config: RunConfig,
              settings: FlowerSettings) -> None:
    """File again a party :func:`_load` gave to a handler that only read it (no :func:`_save`)."""
    meta = context.state.get(SECURE_CONFIG)
    if meta is not None:
        PARTIES.put_back(meta.get(LIVE_TOKEN), _party_key(context, data, config, settings), party)


def _save(context: Context, party: SecureClientParty, data: TenantData, config: RunConfig,
          settings: FlowerSettings) -> None:
    """Write ``party`` into the state and keep it live for the next message (its handler's last
    touch of the party)."""
    memo = _MEMOS.setdefault(party, {})
    arrays, meta = state_to_records(party.state_dict(copy=False), memo)  # serialized at once: no copies needed
    directory = spill_dir(context, mirrored=node_state_dir(context, settings, data.tenant) is not None)
    if directory is not None:
        old = context.state.get(SECURE_CONFIG)
        arrays, meta[SPILL_GENERATION] = spill_store(directory).spill(
            arrays, context.state.get(SECURE_ARRAYS), int(old.get(SPILL_GENERATION, 0)) if old is not None else 0)
    meta[LIVE_TOKEN] = PARTIES.keep(_party_key(context, data, config, settings), party)
    context.state[SECURE_ARRAYS] = arrays
    context.state[SECURE_CONFIG] = meta


def _reconcile(context: Context, party: SecureClientParty, record: ConfigRecord) -> None:
    """Match the cloud's update and sharing-load counts in a begin instruction (the reply reports
    this tenant's: no sharing load is accepted after it, :func:`note_begin`)."""
    party.reconcile({"head": config_value(record, ConfigKey.HEAD_UPDATES, int),
                     "tail": config_value(record, ConfigKey.TAIL_UPDATES, int),
                     "loads": config_value(record, ConfigKey.SHARE_LOADS, int)})
    note_begin(context)


def _confirm_key(party: SecureClientParty, instruction: ConfigRecord) -> None:
    """``he``: the cloud's key id in the instruction acknowledges a pending rotation (or not)."""
    if party.he_key_id is not None:
        party.confirm_key_rotation(config_value(instruction, ConfigKey.HE_KEY_ID, bytes))


def _ahead(instruction: ConfigRecord) -> tuple[int, int, int, int] | None:
    """The cloud's (step, batch, tokens, rows) of material it holds ahead (None: none)."""
    if ConfigKey.AHEAD_STEP not in instruction:
        return None
    shape = config_value(instruction, ConfigKey.AHEAD_SHAPE, list)
    return (config_value(instruction, ConfigKey.AHEAD_STEP, int), *shape)


def _sync(party: SecureClientParty) -> ConfigRecord:
    counts = party.counts
    return ConfigRecord({ConfigKey.HEAD_UPDATES: counts["head"], ConfigKey.TAIL_UPDATES: counts["tail"],
                         ConfigKey.SHARE_LOADS: counts["loads"]})


def secure_setup(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                 data: TenantData) -> RecordDict:
    hello = unpack_hello(message.content)
    if SECURE_ARRAYS in context.state and not context.node_config.get(NEW_SETUP_CONFIG, False):
        old = _load(context, data, config, settings)
        if any(old.counts.values()) or old.state_dict()["next_step"]:
            raise ProtocolError(f"tenant {data.tenant!r} holds a trained secure party; a new set-up would discard it "
                                f"(a cloud that lost its state?). Resume the session, or set node config "
                                f"{NEW_SETUP_CONFIG} = true to start over")
    party = _new_party(data, config, settings, context)  # a new set-up replaces an untrained earlier one
    pinned = pinned_dealer(context.node_config)
    setup = party.setup(hello, pinned, allow_unpinned=pinned is None and allow_unpinned(context.node_config))
    _save(context, party, data, config, settings)
    return pack_setup(setup)


def secure_train_begin(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                       data: TenantData) -> RecordDict:
    instruction = read_config(message.content)
    party = _load(context, data, config, settings)
    _reconcile(context, party, instruction)
    _confirm_key(party, instruction)
    stopped = stop_rule(context, config, config_value(instruction, ConfigKey.SERVER_ROUND, int))
    if stopped:  # the tenant's own loss reached its target: no step, the round it stopped
        _save(context, party, data, config, settings)
        return RecordDict({RecordKey.SYNC: _sync(party), RecordKey.METRICS: MetricRecord({MetricKey.STOPPED: stopped})})
    note_training_begin(context, config_value(instruction, ConfigKey.SERVER_ROUND, int))
    cursor = Cursor.load(context.state)
    batches = train_batches(data, config, cursor, 1, randomized_labels(context, config, data))
    if not batches:
        raise ProtocolError(f"tenant {data.tenant!r}: no training data")
    first = party.begin(batches[0], train=True, cloud_step=config_value(instruction, ConfigKey.NEXT_STEP, int),
                        ahead=_ahead(instruction))
    if party.label_noise is not None:  # counted at the begin: a step cut short still counts (conservative)
        party.label_noise.count(batches[0].indices)
    _save(context, party, data, config, settings)
    cursor.save(context.state)
    context.state[SECURE_BATCH] = ConfigRecord({"size": len(batches[0].labels)})
    sync = _sync(party)
    upcoming = next_batch_shape(data, config, cursor)
    if upcoming:  # the next training step's shape, public then anyway: its material can be dealt ahead
        sync[ConfigKey.NEXT_BATCH], sync[ConfigKey.NEXT_TOKENS], sync[ConfigKey.NEXT_ROWS] = upcoming
    return pack_secure(first, RecordDict({RecordKey.SYNC: sync}))


def secure_eval_begin(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                      data: TenantData) -> RecordDict:
    instruction = read_config(message.content)
    restart = config_value(instruction, ConfigKey.RESTART, bool)
    test, scope = eval_set(data, instruction, context, config, settings)
    if restart and scope == PREDICT_SCOPE:
        start_output(context)
    party = _load(context, data, config, settings)
    _reconcile(context, party, instruction)
    _confirm_key(party, instruction)
    cursor = Cursor.load(context.state)
    if restart:
        cursor.eval_cursor = 0
    content = RecordDict({RecordKey.SYNC: _sync(party)})
    if cursor.eval_cursor < len(test):
        rows = list(range(cursor.eval_cursor, min(len(test), cursor.eval_cursor + config.batch_size)))
        cursor.eval_cursor += len(rows)
        batch = test.collate(rows)
        first = party.begin(batch, train=False, cloud_step=config_value(instruction, ConfigKey.NEXT_STEP, int),
                            ahead=_ahead(instruction))
        pack_secure(first, content)
        context.state[SECURE_BATCH] = ConfigRecord({"size": len(batch.labels)})
        context.state[SECURE_LABELS] = ArrayRecord({"labels": tensor_to_array("labels", batch.labels.long()),
                                                    "indices": tensor_to_array("indices", batch.indices.long())})
        note_scope(context, scope)
    remaining = -(-(len(test) - cursor.eval_cursor) // config.batch_size)
    _save(context, party, data, config, settings)
    cursor.save(context.state)
    content[RecordKey.METRICS] = MetricRecord({MetricKey.REMAINING: remaining})
    return content


def secure_rekey(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                 data: TenantData) -> RecordDict:
    """A new CKKS key pair; the reply carries its public context (the old key stays in use until acked)."""
    instruction = read_config(message.content)
    party = _load(context, data, config, settings)
    party.confirm_key_rotation(config_value(instruction, ConfigKey.HE_KEY_ID, bytes))
    rotation = party.start_key_rotation()
    _save(context, party, data, config, settings)
    return pack_key_rotation(rotation)


def secure_resume(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                  data: TenantData) -> RecordDict:
    """A resumed cloud's challenge: prove this node holds the tenant's key (no state changes)."""
    challenge = read_record(message.content, RecordKey.RESUME, ConfigRecord)
    party = _load(context, data, config, settings)
    proof = party.prove_resume(challenge.get("ephemeral"), challenge.get("nonce"))
    _put_back(context, party, data, config, settings)
    return RecordDict({RecordKey.RESUME: ConfigRecord({"proof": proof})})


def secure_next(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                data: TenantData) -> RecordDict:
    party = _load(context, data, config, settings)
    incoming = unpack_secure(message.content, data.tenant, "cloud")
    reply = party.handle(incoming)
    content = pack_secure(reply) if reply is not None else RecordDict()
    if incoming.step in party.finished:
        result = party.pop_result(incoming.step)
        if incoming.train and result.loss is not None:
            note_loss(context, float(result.loss))
        if incoming.train:
            note_training_step(context)
        metrics: dict[str, int | float | list[int]] = {MetricKey.DONE: 1}
        predicted = None if incoming.train else _predictions(context, config, settings, result)
        if predicted is not None:  # the node's own texts: predictions to its own file, a count to the cloud
            metrics[MetricKey.NUM_EXAMPLES] = predicted
        elif settings.secure_metrics:
            metrics.update(_step_metrics(context, data, party, incoming.train, result))
        content[RecordKey.METRICS] = MetricRecord(metrics)
    _save(context, party, data, config, settings)
    return content


def _predictions(context: Context, config: RunConfig, settings: FlowerSettings,
                 result: SecureStepResult) -> int | None:
    """An inference step of scope ``predict``: its predictions appended to the node's output
    file (:mod:`~flower_split.flower.node_predict`), how many; None for any other scope."""
    if not predicting(context):
        return None
    record = context.state.get(SECURE_LABELS)
    if not isinstance(record, ArrayRecord) or "indices" not in record:
        raise ProtocolError("prediction step finished but its rows are not in the state")
    return append_predictions(context, config, settings, [(state_tensor("indices", record["indices"]), result.logits)])


def _step_metrics(context: Context, data: TenantData, party: SecureClientParty, train: bool,
                  result: SecureStepResult) -> dict:
    """What the tenant reports of a finished step: never a decrypted value, never its loss.

    Training: the batch size (public anyway) and, under label-DP, the tenant's epsilon so far
    (a function of its label uses, not of the labels). Evaluation: counts from the logits opened
    to the client alone (inference decrypts nothing).
    """
    if train:
        size = config_value(context.state[SECURE_BATCH], "size", int, SECURE_BATCH)
        if party.label_noise is None:
            return {MetricKey.NUM_EXAMPLES: size}
        return {MetricKey.NUM_EXAMPLES: size, MetricKey.LABEL_DP_EPSILON: party.label_noise.epsilon()}
    record = context.state.get(SECURE_LABELS)
    if not isinstance(record, ArrayRecord) or "labels" not in record:
        raise ProtocolError("evaluation step finished but its labels are not in the state")
    labels = state_tensor("labels", record["labels"])  # a restored node mirror stores raw Arrays
    predicted = result.logits.argmax(-1)
    tp, fp, fn = class_counts(predicted, labels, data.num_classes)
    return {MetricKey.CORRECT: int((predicted == labels).sum()), MetricKey.NUM_EXAMPLES: int(labels.numel()),
            MetricKey.TP: tp, MetricKey.FP: fp, MetricKey.FN: fn}


HANDLERS: dict[str, Handler] = {
    MessageType.SECURE_SETUP: secure_setup,
    MessageType.SECURE_TRAIN_BEGIN: secure_train_begin,
    MessageType.SECURE_REKEY: secure_rekey,
    MessageType.SECURE_RESUME: secure_resume,
    MessageType.SECURE_TRAIN_NEXT: secure_next,
    MessageType.SECURE_EVAL_BEGIN: secure_eval_begin,
    MessageType.SECURE_EVAL_NEXT: secure_next,
}
