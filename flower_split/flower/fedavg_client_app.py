"""Flower ClientApp of the FedAvg-LoRA family: every tenant fine-tunes the whole model.

Each tenant holds the full encoder with peft LoRA adapters on all linear layers and a linear
classifier (:mod:`flower_split.flower.fedavg_training`, the centralized baseline's model). Only
the trainable parameters (LoRA matrices and classifier) travel; the frozen pretrained weights
are the same on every node (pretrained, or seeded for ``tiny``).

Message types (Flower's ``FedAvg`` / ``FedProx`` send the default actions):

``train``              server: ``arrays`` (global trainable parameters), ``config`` {local-epochs,
                       server-round, and optionally proximal-mu (FedProx), local-only}. Client:
                       ``local-epochs`` passes over its partition with AdamW (fresh each round, as
                       usual for FedAvg), learning rate ``lr`` on the warm-up + cosine schedule of
                       the whole run (``num-server-rounds`` rounds), plus ``proximal-mu / 2 *
                       ||w - w_global||^2`` in the loss when ``proximal-mu`` > 0 -> ``arrays`` (its
                       trainable parameters), ``metrics`` {num-examples (partition size, the
                       FedAvg weight), train-loss, steps, partition-id}. With ``local-only``: the
                       tenant trains its own model (kept in ``context.state``; the first round
                       starts it from ``arrays``, later rounds may send none) and replies with
                       ``metrics`` only: its weights never leave it. It keeps the model it started
                       the round from too: a resumed cloud that sends the same round again gets
                       that round trained again from the same start (same seed, same result);
                       a round older than the tenant's last is refused.
``evaluate``           server: ``arrays``, ``config``. Client: accuracy and macro-F1 on its own
                       test split (with ``local-only``: of its own model) -> ``metrics``
                       {num-examples, accuracy, macro-f1, partition-id}.
``train.personalize``  server: ``arrays`` (the final global model), ``config`` {personalize-epochs,
                       server-round}. Client: fine-tunes a copy on its own rows for that many
                       epochs (AdamW, its own warm-up + cosine schedule), evaluates it on its test
                       split, and replies with the evaluation's ``metrics`` plus train-loss, steps
                       and train-examples; the fine-tuned weights never leave it.

Data: exactly the split apps' rows (:func:`flower_split.flower.tenant.tenant_rows`, the one
loader of every federated app: the tenant's own files, node config ``data-path``, or its
partition of the run's data set; :mod:`flower_split.flower.node_data`). ``run_config``: the split app's keys plus
:class:`flower_split.flower.fedavg_settings.FedAvgSettings`. A malformed message gets an error
reply naming the problem, and leaves ``context.state`` as it was. With node config ``state-dir``
(simulation: ``FLOWER_SPLIT_STATE_DIR``) the node mirrors ``context.state`` to disk after every
message and a restarted node takes it up (:mod:`flower_split.flower.node_state`): a local-only
tenant's model survives a stopped run (:mod:`flower_split.flower.fedavg_checkpoint`).
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_split.config import RunConfig
from flower_split.flower.fedavg_settings import (
    FEDAVG_FIELDS, FedAvgSettings, fedavg_settings_from_run_config,
)
from flower_split.flower.fedavg_training import (
    FedAvgMessageError, evaluate, load_trainable, local_train, model_for, round_seed, trainable_state,
)
from flower_split.flower.node_state import mirrored, node_state_dir, rollback
from flower_split.flower.settings import FlowerSettings
from flower_split.flower.tenant import TenantRows, tenant_rows
from flower_split.model import log_label_frequencies
from flower_split.state import StateError

ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
PERSONALIZE = "personalize"  # the message type train.personalize
LOCAL_MODEL = "local-model"  # context.state: a local-only tenant's own trainable parameters
LOCAL_START = "local-start"  # ... and those it started its last training round from
LOCAL_ROUND = "local-round"  # ConfigRecord {round}: that round
BASELINE_ROLE = "baseline-tenant"  # the owner of a FedAvg-family tenant's mirrored state

tenant_data = tenant_rows  # the FedAvg app's data is the split apps' rows


def prepare(context: Context, overrides: Mapping[str, Any] | None = None) -> None:
    """Load (and cache) this node's data and the model: one-off setup, outside the cost meter."""
    config, settings, _ = fedavg_settings_from_run_config({**dict(context.run_config), **dict(overrides or {})})
    data = tenant_rows(config, settings, context.node_config)
    model_for(config, data.num_classes)


def _content(message: Message) -> tuple[ArrayRecord, ConfigRecord]:
    content = message.content
    if "arrays" not in content or "config" not in content:
        raise FedAvgMessageError(f"expected records 'arrays' and 'config', got {sorted(content.keys())}")
    arrays, config = content["arrays"], content["config"]
    if not isinstance(config, ConfigRecord):
        raise FedAvgMessageError(f"config: expected a ConfigRecord, got {type(config).__name__}")
    if not isinstance(arrays, ArrayRecord):
        raise FedAvgMessageError(f"arrays: expected an ArrayRecord, got {type(arrays).__name__}")
    return arrays, config


def _int(record: ConfigRecord, key: str, minimum: int) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FedAvgMessageError(f"config.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _mu(record: ConfigRecord) -> float:
    """FedProx's ``proximal-mu`` (absent: 0, plain FedAvg)."""
    value = record.get("proximal-mu", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise FedAvgMessageError(f"config.proximal-mu: expected a finite number >= 0, got {value!r}")
    return float(value)


def _local_only(record: ConfigRecord) -> bool:
    value = record.get("local-only", False)
    if not isinstance(value, bool):
        raise FedAvgMessageError(f"config.local-only: expected true or false, got {value!r}")
    return value


def _local_start(context: Context, server_round: int) -> str:
    """The state record a local-only training round starts from: the tenant's model, or, for the
    round it trained last (a resumed cloud runs it again), the model it started that round from."""
    last = context.state.get(LOCAL_ROUND)
    done = int(last["round"]) if isinstance(last, ConfigRecord) else 0
    if server_round < done:
        raise FedAvgMessageError(f"local-only: round {server_round} is older than this tenant's last "
                                 f"training round ({done}): a replayed or out-of-order message")
    return LOCAL_START if server_round == done else LOCAL_MODEL


def _load_model(context: Context, config: RunConfig, data: TenantRows, arrays: ArrayRecord,
                own: str | None = None) -> Any:
    """The model with the message's parameters, or (local-only) this tenant's own record ``own``,
    once it has one, and this tenant's prior offset (``prior_offset``; the process's model serves
    every tenant)."""
    model = model_for(config, data.num_classes)
    model.prior = (log_label_frequencies(data.train.labels, data.num_classes).to(model.classifier.weight.device)
                   if config.prior_offset else None)
    if own is not None and own in context.state:
        load_trainable(model, context.state[own])
    elif own is not None and not len(arrays):
        raise FedAvgMessageError("local-only: this tenant has no model yet and the message carries none")
    else:
        load_trainable(model, arrays)
    return model


# ---------------------------------------------------------------------------------------------
# handlers


def _train(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
           data: TenantRows) -> RecordDict:
    arrays, record = _content(message)
    epochs = _int(record, "local-epochs", 1)
    server_round = _int(record, "server-round", 1)
    mu, local = _mu(record), _local_only(record)
    own = _local_start(context, server_round) if local else None
    model = _load_model(context, config, data, arrays, own)
    start = ArrayRecord(torch_state_dict=trainable_state(model)) if local else None
    steps_per_round = -(-len(data.train) // config.batch_size) * epochs
    offset = steps_per_round * (min(server_round, settings.num_server_rounds) - 1)
    losses = local_train(model, data.train, config, epochs, round_seed(config, data.partition_id, server_round),
                         schedule=(offset, steps_per_round * settings.num_server_rounds), mu=mu)
    metrics = MetricRecord({"num-examples": len(data.train),
                            "train-loss": sum(losses) / len(losses) if losses else 0.0,
                            "steps": len(losses), "partition-id": data.partition_id})
    if local:
        context.state[LOCAL_START] = start
        context.state[LOCAL_MODEL] = ArrayRecord(torch_state_dict=trainable_state(model))
        context.state[LOCAL_ROUND] = ConfigRecord({"round": server_round})
        return RecordDict({"metrics": metrics})
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=trainable_state(model)), "metrics": metrics})


def _evaluate(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
              data: TenantRows) -> RecordDict:
    arrays, record = _content(message)
    local = _local_only(record)
    if local and LOCAL_MODEL not in context.state:
        raise FedAvgMessageError("local-only: nothing to evaluate before this tenant's first training round")
    model = _load_model(context, config, data, arrays, LOCAL_MODEL if local else None)
    scores = evaluate(model, data.test, config, data.num_classes)
    return RecordDict({"metrics": MetricRecord({"num-examples": len(data.test), **scores,
                                                "partition-id": data.partition_id})})


def _personalize(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
                 data: TenantRows) -> RecordDict:
    arrays, record = _content(message)
    epochs = _int(record, "personalize-epochs", 1)
    server_round = _int(record, "server-round", 1)
    model = _load_model(context, config, data, arrays)
    losses = local_train(model, data.train, config, epochs, round_seed(config, data.partition_id, server_round))
    scores = evaluate(model, data.test, config, data.num_classes)
    return RecordDict({"metrics": MetricRecord({
        "num-examples": len(data.test), **scores, "partition-id": data.partition_id,
        "train-loss": sum(losses) / len(losses) if losses else 0.0, "steps": len(losses),
        "train-examples": len(data.train) * epochs})})


def _handle(handler: Any, message: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    config, settings, _ = fedavg_settings_from_run_config({**dict(context.run_config), **overrides})
    data = tenant_rows(config, settings, context.node_config)
    saved = dict(context.state.items())  # handlers replace records, never mutate them in place
    try:
        with mirrored(context, node_state_dir(context, settings, data.tenant),
                      {"role": BASELINE_ROLE, "tenant": data.tenant}):
            content = handler(message, context, config, settings, data)
    except (FedAvgMessageError, StateError, OSError) as exc:
        rollback(context, saved)
        return Message(Error(code=ERROR_CODE, reason=f"{type(exc).__name__} ({data.tenant}): {exc}"),
                       reply_to=message)
    return Message(content, reply_to=message)


def make_fedavg_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The FedAvg-family tenant; ``overrides`` take precedence over ``context.run_config``."""
    extra = dict(overrides or {})
    client_app = ClientApp(mods=mods)

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        return _handle(_train, message, context, extra)

    @client_app.train(PERSONALIZE)
    def personalize(message: Message, context: Context) -> Message:
        return _handle(_personalize, message, context, extra)

    @client_app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return _handle(_evaluate, message, context, extra)

    return client_app


app = make_fedavg_client_app()

__all__ = ["FEDAVG_FIELDS", "FedAvgMessageError", "FedAvgSettings", "LOCAL_MODEL", "PERSONALIZE", "app",
           "fedavg_settings_from_run_config", "load_trainable", "make_fedavg_client_app", "model_for", "prepare",
           "tenant_data", "trainable_state"]
