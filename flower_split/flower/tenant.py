"""What every tenant-side handler shares: the node's data, its adapters' start, its cursors.

``context.state`` (the only thing that survives between a node's Flower messages; in
deployment each message runs in a fresh process) holds the party's state under the keys of
its security level's handlers and, under :data:`DATA_STATE`, the data cursors of
:class:`Cursor`. :func:`handle` runs one handler all-or-nothing: a malformed or out-of-order
message gets an error reply and leaves ``context.state`` as it was.

Data (:mod:`flower_split.flower.node_data`): the tenant's own files (node config
``data-path``; deployment), or node ``partition-id`` of ``num-partitions``'s partition of the
run's data set (spec and seed from ``run_config``) with its own test split of the same label
distribution (:func:`flower_split.data.tenants.split_test_like_train`; simulations).
:func:`tenant_rows` is the one loader of a tenant's rows for every federated app (split and
the FedAvg family).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

from flower_split.config import RunConfig
from flower_split.data import Batch, TokenizedDataset
from flower_split.flower.contract import EVAL_SCOPES, NOT_A_TENANT_CODE, OUT_OF_RANGE_CODE, ConfigKey
from flower_split.flower.dealer_node import PROTOCOL_ERROR_CODE, TENANT_ROLE, node_role
from flower_split.flower.node_data import NodeSource, node_rows, node_source
from flower_split.flower.node_predict import PREDICT_SCOPE, predict_texts
from flower_split.flower.node_state import mirrored, node_state_dir, restored, rollback
from flower_split.flower.records import config_value
from flower_split.flower.settings import FlowerSettings, settings_from_run_config
from flower_split.flower.sharing_views import PHASE_STATE
from flower_split.model import (
    Embedder, HeadAdapter, TailAdapter, adapter_random, hidden_size, load_encoder, load_tokenizer, log_label_frequencies,
    split_encoder,
)
from flower_split.protocol import ProtocolError
from flower_split.protocol.opened_range import OutOfRange
from flower_split.protocol.label_rr import RandomizedLabels
from flower_split.state import StateError

DATA_STATE = "data"
RR_STATE = "label-rr"  # ConfigRecord {key}: the tenant's randomized-response key (label_rr_epsilon)


@dataclass(frozen=True)
class TenantRows:
    """What one node trains and tests on, tokenized: the one loader of every federated app
    (split and the FedAvg-LoRA family), so all of them see exactly the same rows."""

    tenant: str
    partition_id: int
    train: TokenizedDataset
    test: TokenizedDataset
    global_test: TokenizedDataset
    num_classes: int


@dataclass(frozen=True)
class TenantData(TenantRows):
    """A split tenant's rows and the public embedder."""

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
def _tenant_rows(config_items: tuple[tuple[str, Any], ...], source: NodeSource) -> TenantRows:
    config = RunConfig(**dict(config_items))
    rows = node_rows(config, source)
    tokenizer = load_tokenizer(config.model)
    test = TokenizedDataset(rows.test, tokenizer, config.max_length)
    return TenantRows(
        tenant=f"tenant-{rows.partition_id}",
        partition_id=rows.partition_id,
        train=TokenizedDataset(rows.train, tokenizer, config.max_length),
        test=test,
        global_test=test if rows.global_test is rows.test else TokenizedDataset(rows.global_test, tokenizer,
                                                                                 config.max_length),
        num_classes=rows.num_classes,
    )


def tenant_rows(config: RunConfig, settings: FlowerSettings, node_config: Mapping[str, Any]) -> TenantRows:
    """This node's rows (:mod:`flower_split.flower.node_data`: its own files, or its partition; cached)."""
    return _tenant_rows(tuple(sorted(config.to_dict().items())), node_source(config, settings, node_config))


def tenant_data(config: RunConfig, settings: FlowerSettings, node_config: Mapping[str, Any]) -> TenantData:
    """A split tenant's rows (:func:`tenant_rows`) and the public embedder."""
    rows = tenant_rows(config, settings, node_config)
    embedder, dim = _embedder(config.model, config.seed)
    return TenantData(**{f.name: getattr(rows, f.name) for f in dataclasses.fields(TenantRows)},
                      embedder=embedder, dim=dim)


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
    prior = log_label_frequencies(data.train.labels, data.num_classes) if config.prior_offset else None
    tail = TailAdapter(data.dim, config.tail_bottleneck, data.num_classes, config.activation,
                       config.tail_input, rng, prior)
    return head, tail


def randomized_labels(context: Context, config: RunConfig, data: TenantData) -> RandomizedLabels | None:
    """The tenant's randomized response (``label_rr_epsilon``), None when off.

    Its secret key is made once and kept in ``context.state``, so that every message (every
    process, in deployment) sees the same randomized labels: a new draw per use would compose.
    """
    if not config.label_rr_epsilon:
        return None
    record = context.state.get(RR_STATE)
    if isinstance(record, ConfigRecord) and isinstance(record.get("key"), bytes):
        return RandomizedLabels(config.label_rr_epsilon, data.num_classes, record["key"])
    randomized = RandomizedLabels(config.label_rr_epsilon, data.num_classes)
    context.state[RR_STATE] = ConfigRecord({"key": randomized.key})
    return randomized


def train_batches(data: TenantData, config: RunConfig, cursor: Cursor, count: int,
                  randomized: RandomizedLabels | None = None) -> list[Batch]:
    """The next ``count`` training micro-batches; a new shuffled pass starts when one ends.

    ``randomized``: the tenant's randomized response; the batches then carry its labels."""
    batches = []
    for rows in _next_rows(data, config, cursor, count):
        batch = data.train.collate(rows)
        if randomized is not None:
            batch = dataclasses.replace(batch, labels=randomized.apply(batch.labels, batch.indices))
        batches.append(batch)
    return batches


def next_batch_shape(data: TenantData, config: RunConfig, cursor: Cursor) -> tuple[int, int, int] | None:
    """(batch, tokens, real tokens) of the next training batch, from token counts alone
    (``cursor`` stays): its size, its padded length and its attention mask's sum."""
    rows = _next_rows(data, config, dataclasses.replace(cursor), 1)
    if not rows:
        return None
    lengths = [len(data.train.input_ids[i]) for i in rows[0]]
    return len(lengths), max(lengths), sum(lengths)


def _next_rows(data: TenantData, config: RunConfig, cursor: Cursor, count: int) -> list[list[int]]:
    """The row indices of the next ``count`` micro-batches; advances ``cursor``."""
    size = len(data.train)
    if size == 0:
        return []
    chosen = []
    order = _order(size, config.seed, data.partition_id, cursor.epoch)
    for _ in range(count):
        if cursor.cursor >= size:
            cursor.epoch, cursor.cursor = cursor.epoch + 1, 0
            order = _order(size, config.seed, data.partition_id, cursor.epoch)
        rows = order[cursor.cursor : cursor.cursor + config.batch_size]
        cursor.cursor += len(rows)
        chosen.append(rows)
    return chosen


def _order(size: int, seed: int, partition_id: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, partition_id, epoch]).permutation(size).tolist()


def eval_set(data: TenantData, record: ConfigRecord, context: Context, config: RunConfig,
             settings: FlowerSettings) -> tuple[TokenizedDataset, str]:
    """The instruction's ``scope`` and its rows: "tenant" (default): this tenant's test split;
    "global": the whole sampled test set; "predict": the node's own texts (node config
    ``predict-input``, unlabelled)."""
    scope = config_value(record, ConfigKey.SCOPE, str) if ConfigKey.SCOPE in record else "tenant"
    if scope not in EVAL_SCOPES:
        raise ProtocolError(f"config.scope: expected one of {EVAL_SCOPES}, got {scope!r}")
    if scope == PREDICT_SCOPE:
        return predict_texts(context, config, settings)[1], scope
    return (data.test if scope == "tenant" else data.global_test), scope


Handler = Callable[[Message, Context, RunConfig, FlowerSettings, TenantData], RecordDict]


TRANSIENT_RECORDS = frozenset({RECORD_KEY_STATE, PHASE_STATE})
"""Records a tenant never mirrors: Flower's SecAgg+ secrets of the phase in progress (key pair,
mask seed, the others' key shares) and the phase's signers and signed view. A restarted node, or
a second copy of it started by a second run of the same session, then cannot go on with a phase
the first copy began (it would sign a second view of it, docs/secure.md §10); the ledger, which
is mirrored, keeps it from sharing that round again."""


def _error_reply(message: Message, tenant: str, exc: Exception) -> Message:
    """The error reply to ``message`` for a refusal of ``tenant`` (its state is left as it was)."""
    code = OUT_OF_RANGE_CODE if isinstance(exc, OutOfRange) else PROTOCOL_ERROR_CODE
    return Message(Error(code=code, reason=f"{type(exc).__name__} ({tenant}): {exc}"), reply_to=message)


def restore_mod(overrides: Mapping[str, Any]) -> Callable[[Message, Context, Callable[[Message, Context], Message]],
                                                          Message]:
    """A Flower mod for messages whose stages write ``context.state`` outside :func:`handle`
    (SecAgg+'s): with node config ``state-dir``, a restarted node's state is loaded from its
    mirror first (:func:`~flower_split.flower.node_state.restored`), so the stage sees the
    tenant's own state and the node's later messages its own mirror. ``overrides`` as for
    :func:`handle`; a node that is no tenant is left to the stage's own checks."""

    def mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        config, settings = settings_from_run_config({**dict(context.run_config), **overrides})
        if node_role(context.node_config, settings) == TENANT_ROLE:
            tenant = tenant_data(config, settings, context.node_config).tenant
            try:
                restored(context, node_state_dir(context, settings, tenant), {"role": TENANT_ROLE, "tenant": tenant})
            except (StateError, OSError) as exc:
                return _error_reply(message, tenant, exc)
        return call_next(message, context)

    return mod


def handle(handler: Handler, message: Message, context: Context, overrides: Mapping[str, Any],
           validate: Callable[[RunConfig, FlowerSettings], Any] | None = None, security: str | None = None) -> Message:
    """Run one stage handler; a ProtocolError becomes an error reply and the state is kept.

    ``validate`` (the security backend's check of the run) runs before the handler. A handler of
    one security backend (``security``) answers only in a run of that level: a hostile cloud
    could otherwise send split-plain messages in a secure run and read a plain tenant's loss and
    evaluation counts (a hostile review of the private preset). With node
    config ``state-dir`` the node's state is loaded from its mirror when ``context.state`` is
    empty (a restarted SuperNode) and mirrored after the message was handled in full
    (:mod:`flower_split.flower.node_state`); a failed mirror write fails the message.
    """
    config, settings = settings_from_run_config({**dict(context.run_config), **overrides})
    if validate is not None:
        validate(config, settings)
    if security is not None and config.security != security:
        return Message(Error(code=PROTOCOL_ERROR_CODE, reason=f"ProtocolError: {message.metadata.message_type} "
                             f"is a split-{security} message and this run is {config.security}: refused"),
                       reply_to=message)
    if node_role(context.node_config, settings) != TENANT_ROLE:
        return Message(Error(code=NOT_A_TENANT_CODE, reason=f"ProtocolError: {message.metadata.message_type} "
                             "sent to the dealer node, which serves no tenant"), reply_to=message)
    data = tenant_data(config, settings, context.node_config)
    saved = dict(context.state.items())  # handlers replace records, never mutate them in place
    try:
        with mirrored(context, node_state_dir(context, settings, data.tenant),
                      {"role": TENANT_ROLE, "tenant": data.tenant}, TRANSIENT_RECORDS):
            content = handler(message, context, config, settings, data)
    except (ProtocolError, StateError, OSError) as exc:
        rollback(context, saved)
        return _error_reply(message, data.tenant, exc)
    return Message(content, reply_to=message)

