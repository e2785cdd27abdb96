"""Centralized LoRA fine-tuning of the whole encoder on pooled data: the accuracy ceiling."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from flower_split.config import RunConfig
from flower_split.data import Batch, TokenizedDataset
from flower_split.model import load_encoder, masked_mean
from flower_split.protocol.optim import make_optimizer, warmup_cosine
from flower_split.train.metrics import accuracy, macro_f1
from flower_split.train.runtime import CpuClock, select_device, seed_everything


class LoraClassifier(nn.Module):
    """peft-LoRA encoder, mean pooling and a linear classifier."""

    def __init__(self, model: str, num_classes: int, config: RunConfig) -> None:
        super().__init__()
        encoder = load_encoder(model, seed=config.seed)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules="all-linear")
        self.encoder = get_peft_model(encoder, lora)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)
        # a tenant's prior offset on the logits (flower_split.model.prior), set per tenant by the
        # FedAvg client; None here and for the pooled (centralized) model. Never a parameter.
        self.register_buffer("prior", None)

    def forward(self, batch: Batch) -> torch.Tensor:
        hidden = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logits = self.classifier(masked_mean(hidden, batch.attention_mask))
        return logits if self.prior is None else logits + self.prior


def train_centralized(config: RunConfig, train: TokenizedDataset, test: TokenizedDataset,
                      num_classes: int, progress: bool = True) -> dict:
    """Train and evaluate; return the fields of one ``results.json`` run."""
    generator = seed_everything(config.seed)
    device = select_device(config.device)
    model = LoraClassifier(config.model, num_classes, config).to(device)
    optimizer = make_optimizer("adamw", model, config.lr, config.momentum, config.weight_decay)
    steps_per_epoch = -(-len(train) // config.batch_size)
    schedule = warmup_cosine(optimizer, steps_per_epoch * config.epochs, config.warmup_fraction)
    clock = CpuClock()
    history: list[float] = []
    started = time.perf_counter()
    with clock.measure():
        for epoch in range(config.epochs):
            model.train()
            bar = tqdm(train.batches(config.batch_size, True, generator), total=steps_per_epoch,
                       desc=f"centralized epoch {epoch + 1}/{config.epochs}", disable=not progress)
            losses = []
            for batch in bar:
                loss = F.cross_entropy(model(batch.to(device)), batch.labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            history.append(sum(losses) / len(losses))
        predictions, labels = predict_centralized(model, test, config.batch_size, device)
    return {
        "test_accuracy": accuracy(predictions, labels),
        "test_macro_f1": macro_f1(predictions, labels, num_classes),
        "train_loss_history": history,
        "wall_seconds": time.perf_counter() - started,
        "client_cpu_seconds": clock.seconds,
        "bytes_client_to_cloud": 0,
        "bytes_cloud_to_client": 0,
    }


@torch.no_grad()
def predict_centralized(model: LoraClassifier, data: TokenizedDataset, batch_size: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    predictions, labels = [], []
    for batch in data.batches(batch_size, shuffle=False):
        predictions.append(model(batch.to(device)).argmax(-1).cpu())
        labels.append(batch.labels)
    return torch.cat(predictions), torch.cat(labels)
