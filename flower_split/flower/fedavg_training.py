"""What a FedAvg-family tenant computes: local LoRA training (with FedProx's proximal term) and evaluation.

The model is :class:`flower_split.train.centralized.LoraClassifier` (peft LoRA on every linear
layer, mean pooling, a linear classifier: the centralized baseline's model). Only its trainable
parameters (LoRA matrices and classifier) are ever exchanged or stored; the frozen pretrained
weights are the same on every node.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.flower.context_state import state_tensor
from flower_split.protocol import ProtocolError
from flower_split.protocol.optim import lr_factor, make_optimizer
from flower_split.train.centralized import LoraClassifier
from flower_split.train.metrics import accuracy, macro_f1
from flower_split.train.runtime import select_device


class FedAvgMessageError(ValueError):
    """A FedAvg message is malformed (missing record, wrong keys or shapes)."""


@functools.lru_cache(maxsize=1)
def _model(config_items: tuple[tuple[str, Any], ...], num_classes: int) -> LoraClassifier:
    """The process's model; its trainable parameters are overwritten by every message."""
    config = RunConfig(**dict(config_items))
    return LoraClassifier(config.model, num_classes, config).to(select_device(config.device))


def model_for(config: RunConfig, num_classes: int) -> LoraClassifier:
    return _model(tuple(sorted(config.to_dict().items())), num_classes)


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
            try:  # Flower's .npy arrays from the wire, or raw ones from a mirrored node state
                value = state_tensor(f"arrays.{name}", arrays[name])
            except ProtocolError as exc:
                raise FedAvgMessageError(str(exc)) from exc
            if value.shape != param.shape or value.dtype != param.dtype:
                raise FedAvgMessageError(f"arrays.{name}: expected {param.dtype}{list(param.shape)}, "
                                         f"got {value.dtype}{list(value.shape)}")
            param.copy_(value)


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over the trainable parameters (Li et al., 2018)."""
    total = anchor[0].new_zeros(()) if anchor else torch.zeros(())
    for param, start in zip(params, anchor, strict=True):
        total = total + (param - start).pow(2).sum()
    return 0.5 * mu * total


def local_train(model: LoraClassifier, data: TokenizedDataset, config: RunConfig, epochs: int, seed: int,
                schedule: tuple[int, int] | None = None, mu: float = 0.0) -> list[float]:
    """``epochs`` passes of AdamW (fresh) over ``data``; returns every batch's loss.

    ``schedule``: (steps before this call, steps of the whole run) on the warm-up + cosine
    schedule; None: a schedule of this call's own steps. ``mu`` > 0 adds the proximal term
    towards the parameters the model had on entry (FedProx). ``seed`` fixes batch order and dropout.
    """
    size = len(data)
    if not size:
        return []
    device = select_device(config.device)
    steps = -(-size // config.batch_size) * epochs
    offset, total = schedule or (0, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if mu else []
    optimizer = make_optimizer("adamw", model, config.lr, config.momentum, config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step + offset, total, config.warmup_fraction))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        for _ in range(epochs):
            for batch in data.batches(config.batch_size, True, generator):
                loss = F.cross_entropy(model(batch.to(device)), batch.labels.to(device))
                if mu:
                    loss = loss + proximal_term(params, anchor, mu)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_schedule.step()
                losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(model: LoraClassifier, data: TokenizedDataset, config: RunConfig, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` on ``data``."""
    device = select_device(config.device)
    model.eval()
    predictions, labels = [], []
    for batch in data.batches(config.batch_size, shuffle=False):
        predictions.append(model(batch.to(device)).argmax(-1).cpu())
        labels.append(batch.labels)
    predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    truth = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return {"accuracy": accuracy(predicted, truth), "macro-f1": macro_f1(predicted, truth, num_classes)}


def round_seed(config: RunConfig, partition_id: int, server_round: int) -> int:
    """The seed of a tenant's local training in one round (batch order and dropout)."""
    return (config.seed * 1_000_003 + partition_id) * 10_007 + server_round
