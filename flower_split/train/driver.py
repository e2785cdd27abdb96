"""The in-process driver of split training: one loop for every security level.

A :class:`Session` is one tenant's client party connected to the cloud (and, in secure mode,
the dealer) through an in-process transport; the parties exchange exactly the protocol
messages they would exchange under Flower, only the carrier differs. The security backend
builds the session (:mod:`flower_split.backends`); :func:`run_in_process` trains it for
``config.epochs`` epochs, evaluates it on the test set with the inference protocol (client
head -> cloud body -> client tail) and checks that the body did not move.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm

from flower_split.config import RunConfig
from flower_split.data import Batch, TokenizedDataset
from flower_split.model import Body
from flower_split.protocol.label_rr import RandomizedLabels
from flower_split.train.metrics import accuracy, macro_f1
from flower_split.train.runtime import CpuClock


StepHook = Callable[[int, Batch], None]
"""Called after every finished step with its number and batch (the audit records its ground truth)."""


class Session(Protocol):
    """A client party wired to its cloud in one process."""

    @property
    def traffic(self) -> Any:
        """Byte and message counters of the client<->cloud link (``bytes_client_to_cloud`` ...)."""

    def run_step(self, batch: Batch, train: bool, clock: CpuClock) -> int:
        """Drive one step to completion, timing the client's own work on ``clock``; its number."""

    def pop_result(self, step: int) -> Any:
        """The client's result of a finished step (``loss`` for training, ``logits``)."""

    def summary(self) -> dict[str, Any]:
        """What this security level adds to the results (costs per step, label protection)."""


def run_in_process(config: RunConfig, session: Session, body: Body, train: TokenizedDataset,
                   test: TokenizedDataset, num_classes: int, generator: torch.Generator, progress: bool = True,
                   label: str = "split", on_step: StepHook | None = None) -> dict:
    """Train ``session`` on ``train`` (batch order from ``generator``), evaluate it on ``test``;
    one results.json run's metrics. ``on_step`` sees every finished step, training and test."""
    body_before = body.fingerprint()
    randomized = RandomizedLabels(config.label_rr_epsilon, num_classes) if config.label_rr_epsilon else None
    steps_per_epoch = -(-len(train) // config.batch_size)
    clock = CpuClock()
    history: list[float] = []
    started = time.perf_counter()
    for epoch in range(config.epochs):
        bar = tqdm(train.batches(config.batch_size, True, generator), total=steps_per_epoch,
                   desc=f"{label} epoch {epoch + 1}/{config.epochs}", disable=not progress)
        losses = []
        for batch in bar:
            used = batch if randomized is None else \
                dataclasses.replace(batch, labels=randomized.apply(batch.labels, batch.indices))
            step = session.run_step(used, True, clock)
            if on_step is not None:
                on_step(step, batch)  # the true labels: the audit scores against them
            losses.append(float(session.pop_result(step).loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history.append(sum(losses) / len(losses))
    predicted, truth = predict(session, clock, test, config.batch_size, on_step)
    if body.fingerprint() != body_before:
        raise AssertionError("the body changed during training; it must stay frozen")
    return {
        "test_accuracy": accuracy(predicted, truth),
        "test_macro_f1": macro_f1(predicted, truth, num_classes),
        "train_loss_history": history,
        "wall_seconds": time.perf_counter() - started,
        "client_cpu_seconds": clock.seconds,
        "bytes_client_to_cloud": session.traffic.bytes_client_to_cloud,
        "bytes_cloud_to_client": session.traffic.bytes_cloud_to_client,
        **session.summary(),
        **(randomized.summary() if randomized is not None else {"label_rr_epsilon": None}),
    }


def predict(session: Session, clock: CpuClock, data: TokenizedDataset, batch_size: int,
            on_step: StepHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference protocol over ``data``: the predicted and the true labels."""
    predictions, labels = [], []
    for batch in data.batches(batch_size, shuffle=False):
        step = session.run_step(batch, False, clock)
        if on_step is not None:
            on_step(step, batch)
        predictions.append(session.pop_result(step).logits.argmax(-1))
        labels.append(batch.labels)
    return torch.cat(predictions), torch.cat(labels)
