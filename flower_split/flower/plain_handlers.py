"""Tenant-side handlers of split-plain: one function per message type (see :data:`HANDLERS`).

``train.head_fwd``     server: ``config`` {num-batches, known, server-round}. Client: the next
                       micro-batches of its partition through embeddings and head -> pack of
                       ``HeadOutput``. ``known``: the tenant has trained in this run, so a node
                       without its state refuses (never a silent fresh start). A tenant whose own
                       stop rule fired (node config ``target-loss``, :mod:`~flower_split.flower.
                       stop_rule`) sends no step but ``metrics`` {stopped: that round}.
``train.tail``         server: pack of ``BodyOutput``. Client: tail forward, loss, tail update ->
                       pack of ``BodyGrad`` (empty when the head is frozen) and ``metrics``
                       {num-examples, train-loss (not under label-DP or with ``secure-metrics``
                       false), label-dp-epsilon (with label-DP)}.
``train.head_bwd``     server: pack of ``HeadGrad``. Client: head update -> ``metrics`` {steps}.
``evaluate.infer_fwd`` server: ``config`` {num-batches, restart, scope, known}. Client: next test batches
                       (``scope`` "tenant": its own test split; "global": the whole sampled test
                       set; "predict": its own texts, :mod:`~flower_split.flower.node_predict`)
                       through the head -> pack of ``HeadOutput`` (train=False), ``metrics`` {remaining}.
``evaluate.infer_tail`` server: pack of ``BodyOutput``. Client: tail -> ``metrics`` {correct,
                       num-examples, tp, fp, fn} (per-class counts, for macro-F1), nothing with
                       ``secure-metrics`` false; "predict": the predictions appended to its own
                       output file, ``metrics`` {num-examples}.

``context.state`` holds ``party.arrays`` / ``party.config`` (adapters, optimizer momentum,
schedule, step counter, in-flight batches; see :meth:`ClientParty.state_dict`) and the data
cursors (:class:`~flower_split.flower.tenant.Cursor`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from flower_split.config import RunConfig
from flower_split.flower.contract import ConfigKey, MessageType, MetricKey, RecordKey
from flower_split.flower.records import config_value, pack_messages, read_config, unpack_messages
from flower_split.flower.context_state import records_to_state, state_to_records
from flower_split.flower.settings import FlowerSettings
from flower_split.flower.sharing_policy import note_training_begin, note_training_step
from flower_split.flower.stop_rule import note_loss, stop_rule
from flower_split.flower.tenant import (
    Cursor, Handler, TenantData, eval_set, new_adapters, randomized_labels, train_batches,
)
from flower_split.flower.node_privacy import node_input_noise
from flower_split.flower.node_predict import PREDICT_SCOPE, append_predictions, note_scope, predicting, start_output
from flower_split.protocol import BodyGrad, BodyOutput, ClientParty, HeadGrad, HeadOutput, ProtocolError
from flower_split.train.metrics import class_counts
from flower_split.train.runtime import select_device

PARTY_ARRAYS = "party.arrays"
PARTY_CONFIG = "party.config"
PRIVATE_PLAIN = {"train_head": False}
"""What a private node requires of a split-plain run besides no reports and no sharing: a frozen
head (no ``dL/dh``). Its label protection setting is moot: plain sends no logits."""


def _new_party(data: TenantData, config: RunConfig, settings: FlowerSettings) -> ClientParty:
    """A plain party with freshly initialised adapters."""
    head, tail = new_adapters(data, config)
    party = ClientParty(data.tenant, data.embedder, head, tail, config, settings.total_steps,
                        select_device(config.device))
    # the loss stays on the tenant (no reports, or label-DP): no reply may say whether it was finite
    party.skip_diverged = not settings.secure_metrics or party.label_noise is not None
    return party


def _load_party(context: Context, data: TenantData, config: RunConfig, settings: FlowerSettings,
                drop_in_flight: bool, known: bool = False) -> tuple[ClientParty, dict[str, Any] | None]:
    """The party as saved in ``context.state`` (or new), and the decoded state it was built from.

    ``known``: the cloud says this tenant has trained before; then a missing state is an error
    (the node lost it: restarted without node config ``state-dir``), never a fresh start."""
    party = _new_party(data, config, settings)
    party.input_noise = node_input_noise(context.node_config, config, settings, data.embedder, PRIVATE_PLAIN)
    arrays, meta = context.state.get(PARTY_ARRAYS), context.state.get(PARTY_CONFIG)
    if arrays is None or meta is None:
        if known:
            raise ProtocolError(f"{data.tenant} has trained (the cloud knows it) but this node holds no state of it "
                                "(restarted without node config state-dir?); refusing a silent fresh start")
        return party, None
    state = records_to_state(arrays, meta)
    if drop_in_flight:  # a stage-opening message: anything still in flight was abandoned
        state["steps"] = {}
    try:
        party.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:  # torch's strict loads: modules or optimizer groups differ
        raise ProtocolError(f"{data.tenant}: the saved state does not fit this run's model (a setting that shapes "
                            f"it, e.g. prior_offset = {config.prior_offset} or train_head = {config.train_head}, "
                            f"changed since it was saved): {exc!r}") from exc
    return party, state


def _save_party(context: Context, party: ClientParty) -> None:
    arrays, meta = state_to_records(party.state_dict())
    context.state[PARTY_ARRAYS] = arrays
    context.state[PARTY_CONFIG] = meta


def _num_batches(record: ConfigRecord, settings: FlowerSettings) -> int:
    """The instruction's micro-batch count: 0 .. micro-batches (the strategy never asks for more;
    a larger count would have the tenant embed batches without end)."""
    count = config_value(record, ConfigKey.NUM_BATCHES, int)
    if not 0 <= count <= settings.micro_batches:
        raise ProtocolError(f"config.num-batches: expected 0..{settings.micro_batches} (micro-batches), got {count}")
    return count


def _known(record: ConfigRecord) -> bool:
    return config_value(record, ConfigKey.KNOWN, bool) if ConfigKey.KNOWN in record else False


def _head_fwd(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
              data: TenantData) -> RecordDict:
    record = read_config(message.content)
    count = _num_batches(record, settings)
    party, _ = _load_party(context, data, config, settings, drop_in_flight=True, known=_known(record))
    if ConfigKey.SERVER_ROUND in record:
        server_round = config_value(record, ConfigKey.SERVER_ROUND, int)
        note_training_begin(context, server_round)
        stopped = stop_rule(context, config, server_round)
        if stopped:  # the tenant's own loss reached its own target: no step, the round it stopped
            _save_party(context, party)
            return pack_messages(HeadOutput, data.tenant, [], {MetricKey.STOPPED: stopped})
    cursor = Cursor.load(context.state)
    batches = train_batches(data, config, cursor, count, randomized_labels(context, config, data))
    outputs = [party.begin(batch, train=True) for batch in batches]
    _save_party(context, party)
    cursor.save(context.state)
    return pack_messages(HeadOutput, data.tenant, outputs)


def _tail(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
          data: TenantData) -> RecordDict:
    incoming = unpack_messages(message.content, BodyOutput, data.tenant)
    party, _ = _load_party(context, data, config, settings, drop_in_flight=False)
    grads, loss_sum, examples = [], 0.0, 0
    for body_output in incoming:
        grad = party.handle(body_output)
        if grad is not None:
            grads.append(grad)
        result = party.pop_result(body_output.step)
        if result.loss is None:
            raise ProtocolError(f"step {body_output.step} is an inference step; train.tail expects training steps")
        if math.isfinite(result.loss):  # a step that ended without an update (skip_diverged) counts for nothing
            note_loss(context, float(result.loss))  # for the tenant's own stop rule
        loss_sum += result.loss * result.logits.shape[0]
        examples += result.logits.shape[0]
    _save_party(context, party)
    metrics: dict[str, float] = {MetricKey.NUM_EXAMPLES: examples}
    if party.label_noise is not None:  # under label-DP the loss is not noised, so it stays on the tenant
        metrics[MetricKey.LABEL_DP_EPSILON] = party.label_noise.epsilon()  # from its own label uses
    elif settings.secure_metrics:  # the client reports its own mean loss (plain mode only)
        metrics[MetricKey.TRAIN_LOSS] = loss_sum / examples if examples else 0.0
    return pack_messages(BodyGrad, data.tenant, grads, metrics)


def _head_bwd(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
              data: TenantData) -> RecordDict:
    incoming = unpack_messages(message.content, HeadGrad, data.tenant)
    party, _ = _load_party(context, data, config, settings, drop_in_flight=False)
    for head_grad in incoming:
        if party.handle(head_grad) is not None:
            raise ProtocolError(f"step {head_grad.step}: unexpected reply after HeadGrad")
    _save_party(context, party)
    note_training_step(context, len(incoming))
    return RecordDict({RecordKey.METRICS: MetricRecord({MetricKey.STEPS: len(incoming)})})


def _infer_fwd(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
               data: TenantData) -> RecordDict:
    record = read_config(message.content)
    count = config_value(record, ConfigKey.NUM_BATCHES, int)  # the loop below ends with the test set
    restart = config_value(record, ConfigKey.RESTART, bool)
    test, scope = eval_set(data, record, context, config, settings)
    if count < 0:
        raise ProtocolError(f"config.num-batches: must be >= 0, got {count}")
    party, _ = _load_party(context, data, config, settings, drop_in_flight=True,
                           known=_known(record) or scope == PREDICT_SCOPE)  # predictions need a trained party
    cursor = Cursor.load(context.state)
    note_scope(context, scope)
    if restart:
        cursor.eval_cursor = 0
        if scope == PREDICT_SCOPE:
            start_output(context)
    size = len(test)
    outputs = []
    for _ in range(count):
        if cursor.eval_cursor >= size:
            break
        rows = list(range(cursor.eval_cursor, min(size, cursor.eval_cursor + config.batch_size)))
        cursor.eval_cursor += len(rows)
        outputs.append(party.begin(test.collate(rows), train=False))
    remaining = -(-(size - cursor.eval_cursor) // config.batch_size)
    _save_party(context, party)
    cursor.save(context.state)
    return pack_messages(HeadOutput, data.tenant, outputs, {MetricKey.REMAINING: remaining})


def _infer_tail(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                data: TenantData) -> RecordDict:
    incoming = unpack_messages(message.content, BodyOutput, data.tenant)
    party, state = _load_party(context, data, config, settings, drop_in_flight=False)
    steps = state["steps"] if state is not None else {}
    predictions, labels, logits, indices = [], [], [], []
    for body_output in incoming:
        entry = steps.get(body_output.step)
        if entry is not None and entry["train"]:
            raise ProtocolError(f"step {body_output.step} is a training step; evaluate.infer_tail expects inference")
        party.handle(body_output)  # validates tenant, step, stage, shape
        labels.append(entry["labels"])
        indices.append(entry["indices"])
        logits.append(party.pop_result(body_output.step).logits)
        predictions.append(logits[-1].argmax(-1))
    _save_party(context, party)
    if predicting(context):  # the node's own texts: predictions to its own file, a count to the cloud
        done = append_predictions(context, config, settings, list(zip(indices, logits)))
        return RecordDict({RecordKey.METRICS: MetricRecord({MetricKey.NUM_EXAMPLES: done})})
    if not settings.secure_metrics:  # it keeps its counts (the private preset: per-class counts of
        return RecordDict()          # a batch of one name its label)
    # plain mode only: the client reports its own counts (correct, and per class for macro-F1)
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    truth = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    tp, fp, fn = class_counts(predicted, truth, data.num_classes)
    return RecordDict({RecordKey.METRICS: MetricRecord({
        MetricKey.CORRECT: int((predicted == truth).sum()), MetricKey.NUM_EXAMPLES: int(truth.numel()),
        MetricKey.TP: tp, MetricKey.FP: fp, MetricKey.FN: fn})})


HANDLERS: dict[str, Handler] = {
    MessageType.HEAD_FWD: _head_fwd,
    MessageType.TAIL: _tail,
    MessageType.HEAD_BWD: _head_bwd,
    MessageType.INFER_FWD: _infer_fwd,
    MessageType.INFER_TAIL: _infer_tail,
}
