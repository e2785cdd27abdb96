"""Flower ClientApp of a tenant (security level ``plain`` here; ``secure`` in :mod:`secure_client_app`).

Every Flower message is handled by a fresh :class:`ClientParty` rebuilt from
``context.state`` (the only thing that survives between messages; in deployment each message
runs in a fresh process), and its state is written back only when the whole message was
handled: a malformed or out-of-order message gets an error reply and leaves the state as it was.

Message types (Flower requires ``<category>.<action>``):

``train.head_fwd``     server: ``config`` {num-batches}. Client: the next micro-batches of its
                       partition through embeddings and head -> pack of ``HeadOutput``.
``train.tail``         server: pack of ``BodyOutput``. Client: tail forward, loss, tail update ->
                       pack of ``BodyGrad`` (empty when the head is frozen) and, plain mode only,
                       ``metrics`` {train-loss, num-examples}.
``train.head_bwd``     server: pack of ``HeadGrad``. Client: head update -> ``metrics`` {steps}.
``evaluate.infer_fwd`` server: ``config`` {num-batches, restart, scope}. Client: next test batches
                       (``scope`` "tenant": its own test split; "global": the whole sampled test
                       set) through the head -> pack of ``HeadOutput`` (train=False), ``metrics`` {remaining}.
``evaluate.infer_tail`` server: pack of ``BodyOutput``. Client: tail -> ``metrics`` {correct,
                       num-examples, tp, fp, fn} (per-class counts, for macro-F1).

``context.state`` holds ``party.arrays`` / ``party.config`` (adapters, optimizer momentum,
schedule, step counter, in-flight batches; see :meth:`ClientParty.state_dict`) and ``data``
(epoch and cursor of the training stream, cursor of the test stream).

Data: node ``partition-id`` of ``num-partitions`` (``context.node_config``) loads its
partition of the training set (spec and seed from ``run_config``) and its own test split with
the label distribution of that partition (:func:`split_test_like_train`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_split.config import RunConfig
from flower_split.data import Batch, TokenizedDataset
from flower_split.data.tenants import sample_rows, split_test_like_train, tenant_splits  # noqa: F401 (re-exported)
from flower_split.model import (
    Embedder, HeadAdapter, TailAdapter, adapter_random, hidden_size, load_encoder, load_tokenizer, split_encoder,
)
from flower_split.protocol import BodyGrad, BodyOutput, ClientParty, HeadGrad, HeadOutput, ProtocolError
from flower_split.train.metrics import class_counts
from flower_split.train.runtime import select_device
from flower_split.transport.flower import (
    FlowerSettings, config_value, pack_messages, read_config, records_to_state,
    settings_from_run_config, state_to_records, unpack_messages,
)

PARTY_ARRAYS = "party.arrays"
PARTY_CONFIG = "party.config"
DATA_STATE = "data"
SECURE_STATE_KEYS = ("secure.arrays", "secure.config", "secure.batch", "secure.labels")
STATE_KEYS = (PARTY_ARRAYS, PARTY_CONFIG, DATA_STATE) + SECURE_STATE_KEYS
PROTOCOL_ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


@dataclass(frozen=True)
class TenantData:
    """What one node trains and tests on (tokenized), and the public embedder."""

    tenant: str
    partition_id: int
    train: TokenizedDataset
    test: TokenizedDataset
    global_test: TokenizedDataset
    num_classes: int
    embedder: Embedder
    dim: int


# ---------------------------------------------------------------------------------------------
# data


@functools.lru_cache(maxsize=2)
def _embedder(model: str, seed: int) -> tuple[Embedder, int]:
    """The public embedding layer and the hidden size (cached per process; public and frozen)."""
    encoder = load_encoder(model, seed=seed)
    dim = hidden_size(encoder)
    embedder, _ = split_encoder(encoder)
    return embedder, dim


@functools.lru_cache(maxsize=32)  # a simulation actor may serve every tenant in turn
def _tenant_data(config_items: tuple[tuple[str, Any], ...], partition: str, partition_id: int,
                 num_partitions: int) -> TenantData:
    config = RunConfig(**dict(config_items))
    splits = tenant_splits(config, partition, num_partitions)
    tokenizer = load_tokenizer(config.model)
    embedder, dim = _embedder(config.model, config.seed)
    return TenantData(
        tenant=f"tenant-{partition_id}",
        partition_id=partition_id,
        train=TokenizedDataset(splits.tenant_train(partition_id), tokenizer, config.max_length),
        test=TokenizedDataset(splits.tenant_test(partition_id), tokenizer, config.max_length),
        global_test=TokenizedDataset(splits.test, tokenizer, config.max_length),
        num_classes=splits.num_classes,
        embedder=embedder,
        dim=dim,
    )


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from a node's config, validated."""
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            "node_config: the ClientApp needs integer 'partition-id' and 'num-partitions' "
            f"(e.g. flower-supernode --node-config 'partition-id=0 num-partitions=2'); got {dict(node_config)}"
        ) from exc
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node_config: partition-id {partition_id} not in [0, {num_partitions})")
    return partition_id, num_partitions


def tenant_data(config: RunConfig, settings: FlowerSettings, node_config: Mapping[str, Any]) -> TenantData:
    """This node's data, from ``partition-id`` / ``num-partitions`` in its node config."""
    partition_id, num_partitions = node_partition(node_config)
    items = tuple(sorted(config.to_dict().items()))
    return _tenant_data(items, settings.partition, partition_id, num_partitions)


# ---------------------------------------------------------------------------------------------
# party <-> context.state


@dataclass
class Cursor:
    """Position in the training stream (epoch, row) and in the test set."""

    epoch: int = 0
    cursor: int = 0
    eval_cursor: int = 0

    @classmethod
    def load(cls, state: RecordDict) -> "Cursor":
        record = state.get(DATA_STATE)
        if record is None:
            return cls()
        return cls(int(record["epoch"]), int(record["cursor"]), int(record["eval-cursor"]))

    def save(self, state: RecordDict) -> None:
        state[DATA_STATE] = ConfigRecord({"epoch": self.epoch, "cursor": self.cursor,
                                          "eval-cursor": self.eval_cursor})


def new_adapters(data: TenantData, config: RunConfig) -> tuple[HeadAdapter, TailAdapter]:
    """Freshly initialised head and tail (overwritten by saved state).

    Random parts from the tenant's CSPRNG; from ``(seed, partition-id)`` only with
    ``insecure-reproducible-init`` (then the cloud can compute them too).
    """
    rng = adapter_random(config.insecure_reproducible_init, config.seed, data.partition_id)
    head = HeadAdapter(data.dim, config.head_rank, config.activation, rng)
    tail = TailAdapter(data.dim, config.tail_bottleneck, data.num_classes, config.activation,
                       config.tail_input, rng)
    return head, tail


def _new_party(data: TenantData, config: RunConfig, settings: FlowerSettings) -> ClientParty:
    """A plain party with freshly initialised adapters."""
    head, tail = new_adapters(data, config)
    return ClientParty(data.tenant, data.embedder, head, tail, config, settings.total_steps,
                       select_device(config.device))


def _load_party(context: Context, data: TenantData, config: RunConfig, settings: FlowerSettings,
                drop_in_flight: bool) -> tuple[ClientParty, dict[str, Any] | None]:
    """The party as saved in ``context.state`` (or new), and the decoded state it was built from."""
    party = _new_party(data, config, settings)
    arrays, meta = context.state.get(PARTY_ARRAYS), context.state.get(PARTY_CONFIG)
    if arrays is None or meta is None:
        return party, None
    state = records_to_state(arrays, meta)
    if drop_in_flight:  # a stage-opening message: anything still in flight was abandoned
        state["steps"] = {}
    party.load_state_dict(state)
    return party, state


def _save_party(context: Context, party: ClientParty) -> None:
    arrays, meta = state_to_records(party.state_dict())
    context.state[PARTY_ARRAYS] = arrays
    context.state[PARTY_CONFIG] = meta


# ---------------------------------------------------------------------------------------------
# stage handlers: (message, context, config, settings, data) -> reply content


def train_batches(data: TenantData, config: RunConfig, cursor: Cursor, count: int) -> list[Batch]:
    """The next ``count`` training micro-batches; a new shuffled pass starts when one ends."""
    size = len(data.train)
    if size == 0:
        return []
    batches = []
    order = _order(size, config.seed, data.partition_id, cursor.epoch)
    for _ in range(count):
        if cursor.cursor >= size:
            cursor.epoch, cursor.cursor = cursor.epoch + 1, 0
            order = _order(size, config.seed, data.partition_id, cursor.epoch)
        rows = order[cursor.cursor : cursor.cursor + config.batch_size]
        cursor.cursor += len(rows)
        batches.append(data.train.collate(rows))
    return batches


def _order(size: int, seed: int, partition_id: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, partition_id, epoch]).permutation(size).tolist()


def _head_fwd(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
              data: TenantData) -> RecordDict:
    count = config_value(read_config(message.content), "num-batches", int)
    if count < 0:
        raise ProtocolError(f"config.num-batches: must be >= 0, got {count}")
    party, _ = _load_party(context, data, config, settings, drop_in_flight=True)
    cursor = Cursor.load(context.state)
    outputs = [party.begin(batch, train=True) for batch in train_batches(data, config, cursor, count)]
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
        loss_sum += result.loss * result.logits.shape[0]
        examples += result.logits.shape[0]
    _save_party(context, party)
    # the client reports its own mean loss (plain mode only: secure tenants report none)
    metrics = {"train-loss": loss_sum / examples if examples else 0.0, "num-examples": examples}
    return pack_messages(BodyGrad, data.tenant, grads, metrics)


def _head_bwd(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
              data: TenantData) -> RecordDict:
    incoming = unpack_messages(message.content, HeadGrad, data.tenant)
    party, _ = _load_party(context, data, config, settings, drop_in_flight=False)
    for head_grad in incoming:
        if party.handle(head_grad) is not None:
            raise ProtocolError(f"step {head_grad.step}: unexpected reply after HeadGrad")
    _save_party(context, party)
    return RecordDict({"metrics": MetricRecord({"steps": len(incoming)})})


def _infer_fwd(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
               data: TenantData) -> RecordDict:
    record = read_config(message.content)
    count = config_value(record, "num-batches", int)
    restart = config_value(record, "restart", bool)
    test = eval_set(data, record)
    if count < 0:
        raise ProtocolError(f"config.num-batches: must be >= 0, got {count}")
    party, _ = _load_party(context, data, config, settings, drop_in_flight=True)
    cursor = Cursor.load(context.state)
    if restart:
        cursor.eval_cursor = 0
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
    return pack_messages(HeadOutput, data.tenant, outputs, {"remaining": remaining})


EVAL_SCOPES = ("tenant", "global")


def eval_set(data: TenantData, record: ConfigRecord) -> TokenizedDataset:
    """``scope`` "tenant" (default): this tenant's test split; "global": the whole sampled test set."""
    scope = config_value(record, "scope", str) if "scope" in record else "tenant"
    if scope not in EVAL_SCOPES:
        raise ProtocolError(f"config.scope: expected one of {EVAL_SCOPES}, got {scope!r}")
    return data.test if scope == "tenant" else data.global_test


def _infer_tail(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                data: TenantData) -> RecordDict:
    incoming = unpack_messages(message.content, BodyOutput, data.tenant)
    party, state = _load_party(context, data, config, settings, drop_in_flight=False)
    steps = state["steps"] if state is not None else {}
    predictions, labels = [], []
    for body_output in incoming:
        entry = steps.get(body_output.step)
        if entry is not None and entry["train"]:
            raise ProtocolError(f"step {body_output.step} is a training step; evaluate.infer_tail expects inference")
        party.handle(body_output)  # validates tenant, step, stage, shape
        labels.append(entry["labels"])
        predictions.append(party.pop_result(body_output.step).logits.argmax(-1))
    _save_party(context, party)
    # plain mode only: the client reports its own counts (correct, and per class for macro-F1)
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    truth = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    tp, fp, fn = class_counts(predicted, truth, data.num_classes)
    return RecordDict({"metrics": MetricRecord({
        "correct": int((predicted == truth).sum()), "num-examples": int(truth.numel()),
        "tp": tp, "fp": fp, "fn": fn})})


Handler = Callable[[Message, Context, RunConfig, FlowerSettings, TenantData], RecordDict]


def _handle(handler: Handler, message: Message, context: Context,
            overrides: Mapping[str, Any]) -> Message:
    """Run one stage handler; a ProtocolError becomes an error reply and the state is kept."""
    config, settings = settings_from_run_config({**dict(context.run_config), **overrides})
    data = tenant_data(config, settings, context.node_config)
    saved = {key: context.state[key] for key in STATE_KEYS if key in context.state}
    try:
        content = handler(message, context, config, settings, data)
    except ProtocolError as exc:
        for key in STATE_KEYS:  # leave the state as it was
            if key in saved:
                context.state[key] = saved[key]
            elif key in context.state:
                del context.state[key]
        return Message(Error(code=PROTOCOL_ERROR_CODE,
                             reason=f"ProtocolError ({data.tenant}): {exc}"), reply_to=message)
    return Message(content, reply_to=message)


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The tenant's ClientApp; ``overrides`` take precedence over ``context.run_config`` (tests).

    ``mods``: Flower mods wrapped around every handler (e.g. the cost meter of simulations).
    """
    extra = dict(overrides or {})
    client_app = ClientApp(mods=mods)

    @client_app.train("head_fwd")
    def head_fwd(message: Message, context: Context) -> Message:
        return _handle(_head_fwd, message, context, extra)

    @client_app.train("tail")
    def tail(message: Message, context: Context) -> Message:
        return _handle(_tail, message, context, extra)

    @client_app.train("head_bwd")
    def head_bwd(message: Message, context: Context) -> Message:
        return _handle(_head_bwd, message, context, extra)

    @client_app.evaluate("infer_fwd")
    def infer_fwd(message: Message, context: Context) -> Message:
        return _handle(_infer_fwd, message, context, extra)

    @client_app.evaluate("infer_tail")
    def infer_tail(message: Message, context: Context) -> Message:
        return _handle(_infer_tail, message, context, extra)

    from flower_split import secure_client_app as secure  # imports this module's helpers

    @client_app.train("secure_setup")
    def secure_setup(message: Message, context: Context) -> Message:
        return _handle(secure.secure_setup, message, context, extra)

    @client_app.train("secure_begin")
    def secure_train_begin(message: Message, context: Context) -> Message:
        return _handle(secure.secure_train_begin, message, context, extra)

    @client_app.train("secure_rekey")
    def secure_rekey(message: Message, context: Context) -> Message:
        return _handle(secure.secure_rekey, message, context, extra)

    @client_app.train("secure_next")
    def secure_train_next(message: Message, context: Context) -> Message:
        return _handle(secure.secure_next, message, context, extra)

    @client_app.evaluate("secure_begin")
    def secure_eval_begin(message: Message, context: Context) -> Message:
        return _handle(secure.secure_eval_begin, message, context, extra)

    @client_app.evaluate("secure_next")
    def secure_eval_next(message: Message, context: Context) -> Message:
        return _handle(secure.secure_next, message, context, extra)

    return client_app


app = make_client_app()
