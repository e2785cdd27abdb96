"""Flower ClientApp of the FedAvg-LoRA baseline: every tenant fine-tunes the whole model.

Each tenant holds the full encoder with peft LoRA adapters on all linear layers and a linear
classifier (:class:`flower_split.train.centralized.LoraClassifier`, the same model as the
centralized baseline). Only the trainable parameters (LoRA matrices and classifier) travel;
the frozen pretrained weights are the same on every node (pretrained, or seeded for ``tiny``).

Message types (Flower's ``FedAvg`` sends the default actions):

``train``     server: ``arrays`` (global trainable parameters), ``config`` {local-epochs,
              server-round}. Client: ``local-epochs`` passes over its partition with AdamW (fresh
              each round, as usual for FedAvg), learning rate ``lr`` on the warm-up + cosine
              schedule of the whole run (``num-server-rounds`` rounds) -> ``arrays`` (its
              trainable parameters), ``metrics`` {num-examples (partition size, the FedAvg
              weight), train-loss, steps, partition-id}.
``evaluate``  server: ``arrays``. Client: accuracy and macro-F1 on its own test split ->
              ``metrics`` {num-examples, accuracy, macro-f1, partition-id}.

Data: exactly the split apps' rows (:mod:`flower_split.flower.node_data`: the tenant's own
files, node config ``data-path``, or :func:`flower_split.data.tenants.tenant_splits`: same
subsets, partition spec and seed, and per-tenant test split with the tenant's label
distribution). ``run_config``: the split app's keys (see
:func:`flower_split.flower.records.settings_from_run_config`) plus :class:`FedAvgSettings`.
A malformed message gets an error reply naming the problem.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_split.config import ConfigError, RunConfig
from flower_split.data import TokenizedDataset
from flower_split.model import load_tokenizer
from flower_split.protocol.optim import make_optimizer, warmup_cosine
from flower_split.train.centralized import LoraClassifier
from flower_split.train.metrics import accuracy, macro_f1
from flower_split.train.runtime import select_device
from flower_split.flower.node_data import NodeSource, node_rows, node_source
from flower_split.flower.settings import FlowerSettings, settings_from_run_config

ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class FedAvgMessageError(ValueError):
    """A FedAvg message is malformed (missing record, wrong keys or shapes)."""


@dataclass
class FedAvgSettings:
    """FedAvg-LoRA settings that are neither :class:`RunConfig` nor :class:`FlowerSettings`.

    ``run_config`` key: ``local-epochs`` (passes over the tenant's partition per round).
    """

    local_epochs: int = 1

    def validate(self) -> "FedAvgSettings":
        if not isinstance(self.local_epochs, int) or isinstance(self.local_epochs, bool) or self.local_epochs <= 0:
            raise ConfigError(f"local-epochs: expected a positive integer, got {self.local_epochs!r}")
        return self


FEDAVG_FIELDS = frozenset(f.name for f in dataclasses.fields(FedAvgSettings))


def fedavg_settings_from_run_config(values: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings, FedAvgSettings]:
    """Split ``run_config`` into RunConfig, FlowerSettings and FedAvgSettings (all validated)."""
    ours: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in FEDAVG_FIELDS:
            ours[name] = value
        else:
            rest[key] = value
    config, settings = settings_from_run_config(rest)
    return config, settings, FedAvgSettings(**ours).validate()


# ---------------------------------------------------------------------------------------------
# data and model (cached per process: in a simulation one actor serves many messages)


@dataclass(frozen=True)
class FedAvgTenantData:
    partition_id: int
    train: TokenizedDataset
    test: TokenizedDataset
    num_classes: int


@functools.lru_cache(maxsize=32)  # a simulation actor may serve every tenant in turn
def _tenant_data(config_items: tuple[tuple[str, Any], ...], source: NodeSource) -> FedAvgTenantData:
    config = RunConfig(**dict(config_items))
    rows = node_rows(config, source)
    tokenizer = load_tokenizer(config.model)
    return FedAvgTenantData(
        partition_id=rows.partition_id,
        train=TokenizedDataset(rows.train, tokenizer, config.max_length),
        test=TokenizedDataset(rows.test, tokenizer, config.max_length),
        num_classes=rows.num_classes,
    )


def tenant_data(config: RunConfig, settings: FlowerSettings, node_config: Mapping[str, Any]) -> FedAvgTenantData:
    """This node's rows (the same as the split app's: :mod:`flower_split.flower.node_data`), tokenized."""
    return _tenant_data(tuple(sorted(config.to_dict().items())), node_source(config, settings, node_config))


@functools.lru_cache(maxsize=1)
def _model(config_items: tuple[tuple[str, Any], ...], num_classes: int) -> LoraClassifier:
    """The process's model; its trainable parameters are overwritten by every message."""
    config = RunConfig(**dict(config_items))
    return LoraClassifier(config.model, num_classes, config).to(select_device(config.device))


def model_for(config: RunConfig, num_classes: int) -> LoraClassifier:
    return _model(tuple(sorted(config.to_dict().items())), num_classes)


def prepare(context: Context, overrides: Mapping[str, Any] | None = None) -> None:
    """Load (and cache) this node's data and the model: one-off setup, outside the cost meter."""
    config, settings, _ = fedavg_settings_from_run_config({**dict(context.run_config), **dict(overrides or {})})
    data = tenant_data(config, settings, context.node_config)
    model_for(config, data.num_classes)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters FedAvg averages: LoRA matrices and the classifier."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, arrays: object) -> None:
    """Overwrite the trainable parameters from an ArrayRecord (exactly those keys and shapes)."""
    if not isinstance(arrays, ArrayRecord):
        raise FedAvgMessageError(f"arrays: expected an ArrayRecord, got {type(arrays).__name__}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise FedAvgMessageError(f"arrays: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.from_numpy(arrays[name].numpy().copy())
            if value.shape != param.shape or value.dtype != param.dtype:
                raise FedAvgMessageError(f"arrays.{name}: expected {param.dtype}{list(param.shape)}, "
                                         f"got {value.dtype}{list(value.shape)}")
            param.copy_(value)


def _content(message: Message) -> tuple[ArrayRecord, ConfigRecord]:
    content = message.content
    if "arrays" not in content or "config" not in content:
        raise FedAvgMessageError(f"expected records 'arrays' and 'config', got {sorted(content.keys())}")
    config = content["config"]
    if not isinstance(config, ConfigRecord):
        raise FedAvgMessageError(f"config: expected a ConfigRecord, got {type(config).__name__}")
    return content["arrays"], config


def _int(record: ConfigRecord, key: str, minimum: int) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FedAvgMessageError(f"config.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# handlers


def _train(message: Message, config: RunConfig, settings: FlowerSettings, data: FedAvgTenantData) -> RecordDict:
    arrays, record = _content(message)
    epochs = _int(record, "local-epochs", 1)
    server_round = _int(record, "server-round", 1)
    device = select_device(config.device)
    model = model_for(config, data.num_classes)
    load_trainable(model, arrays)
    size = len(data.train)
    steps_per_round = -(-size // config.batch_size) * epochs
    losses: list[float] = []
    if size:
        optimizer = make_optimizer("adamw", model, config.lr, config.momentum, config.weight_decay)
        total = steps_per_round * settings.num_server_rounds
        offset = steps_per_round * (min(server_round, settings.num_server_rounds) - 1)
        factor = warmup_cosine(optimizer, total, config.warmup_fraction).lr_lambdas[0]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + offset))
        seed = (config.seed * 1_000_003 + data.partition_id) * 10_007 + server_round
        generator = torch.Generator().manual_seed(seed)
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout
            for _ in range(epochs):
                for batch in data.train.batches(config.batch_size, True, generator):
                    loss = F.cross_entropy(model(batch.to(device)), batch.labels.to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    losses.append(float(loss.detach()))
    metrics = {"num-examples": size, "train-loss": sum(losses) / len(losses) if losses else 0.0,
               "steps": len(losses), "partition-id": data.partition_id}
    return RecordDict({"arrays": ArrayRecord(torch_state_dict=trainable_state(model)),
                       "metrics": MetricRecord(metrics)})


@torch.no_grad()
def _evaluate(message: Message, config: RunConfig, settings: FlowerSettings, data: FedAvgTenantData) -> RecordDict:
    arrays, _ = _content(message)
    device = select_device(config.device)
    model = model_for(config, data.num_classes)
    load_trainable(model, arrays)
    model.eval()
    predictions, labels = [], []
    for batch in data.test.batches(config.batch_size, shuffle=False):
        predictions.append(model(batch.to(device)).argmax(-1).cpu())
        labels.append(batch.labels)
    size = len(data.test)
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    truth = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return RecordDict({"metrics": MetricRecord({
        "num-examples": size, "accuracy": accuracy(predicted, truth),
        "macro-f1": macro_f1(predicted, truth, data.num_classes), "partition-id": data.partition_id,
    })})


def _handle(handler: Any, message: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    config, settings, _ = fedavg_settings_from_run_config({**dict(context.run_config), **overrides})
    data = tenant_data(config, settings, context.node_config)
    try:
        content = handler(message, config, settings, data)
    except FedAvgMessageError as exc:
        return Message(Error(code=ERROR_CODE, reason=f"FedAvgMessageError (tenant-{data.partition_id}): {exc}"),
                       reply_to=message)
    return Message(content, reply_to=message)


def make_fedavg_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The FedAvg-LoRA tenant; ``overrides`` take precedence over ``context.run_config``."""
    extra = dict(overrides or {})
    client_app = ClientApp(mods=mods)

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        return _handle(_train, message, context, extra)

    @client_app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _handle(_evaluate, message, context, extra)

    return client_app


app = make_fedavg_client_app()
