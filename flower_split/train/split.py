"""In-process split training: one client party and the cloud party through a transport.

The parties exchange exactly the protocol messages they would exchange under Flower; only the
carrier differs. The body's fingerprint is checked after training: it must not have moved.
``config.security`` picks the parties: ``plain`` (split-plain) or ``secure`` (2PC adapters,
a dealer party, and the label protection of ``config.label_protection``).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from flower_split.config import ConfigError, RunConfig
from flower_split.data import Batch, TokenizedDataset
from flower_split.model import adapter_random, build_split
from flower_split.protocol import ClientParty, CloudParty
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.transport.secure_local import SecureLocalTransport
from flower_split.train.metrics import accuracy, macro_f1
from flower_split.train.runtime import CpuClock, select_device, seed_everything
from flower_split.transport import InProcessTransport


def train_split(config: RunConfig, train: TokenizedDataset, test: TokenizedDataset,
                num_classes: int, progress: bool = True) -> dict:
    """Train the split model and evaluate it; return one results.json run.

    Dispatches on ``config.security``: ``plain`` runs the split-plain parties, ``secure``
    the secure ones (:func:`train_split_secure`).
    """
    if config.security == "secure":
        return train_split_secure(config, train, test, num_classes, progress)
    generator = seed_everything(config.seed)
    device = select_device(config.device)
    parts = build_split(config.model, num_classes, config.head_rank, config.tail_bottleneck,
                        config.activation, config.seed, config.tail_input,
                        adapter_random(config.insecure_reproducible_init, config.seed))
    body_before = parts.body.fingerprint()
    cloud = CloudParty(parts.body, device)
    transport = InProcessTransport(cloud)
    steps_per_epoch = -(-len(train) // config.batch_size)
    client = ClientParty("tenant-0", parts.embedder, parts.head, parts.tail, config,
                         steps_per_epoch * config.epochs, device)
    clock = CpuClock()
    history: list[float] = []
    started = time.perf_counter()
    for epoch in range(config.epochs):
        bar = tqdm(train.batches(config.batch_size, True, generator), total=steps_per_epoch,
                   desc=f"split epoch {epoch + 1}/{config.epochs}", disable=not progress)
        losses = []
        for batch in bar:
            step = run_step(client, transport, clock, batch, train=True)
            losses.append(client.pop_result(step).loss)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history.append(sum(losses) / len(losses))
    predictions, labels = predict_split(client, transport, clock, test, config.batch_size)
    if parts.body.fingerprint() != body_before:
        raise AssertionError("the body changed during training; it must stay frozen")
    return {
        "test_accuracy": accuracy(predictions, labels),
        "test_macro_f1": macro_f1(predictions, labels, num_classes),
        "train_loss_history": history,
        "wall_seconds": time.perf_counter() - started,
        "client_cpu_seconds": clock.seconds,
        "bytes_client_to_cloud": transport.traffic.bytes_client_to_cloud,
        "bytes_cloud_to_client": transport.traffic.bytes_cloud_to_client,
    }


def run_step(client: ClientParty, transport: InProcessTransport, clock: CpuClock, batch: Batch,
             train: bool) -> int:
    """Drive one step to completion, timing only the client's own work; return its number."""
    with clock.measure():
        message = client.begin(batch, train=train)
    step = message.step
    while message is not None:
        reply = transport.send(message)
        with clock.measure():
            message = client.handle(reply)
    return step


def predict_split(client: ClientParty, transport: InProcessTransport, clock: CpuClock,
                  data: TokenizedDataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference protocol: client head -> cloud body -> client tail."""
    predictions, labels = [], []
    for batch in data.batches(batch_size, shuffle=False):
        step = run_step(client, transport, clock, batch, train=False)
        predictions.append(client.pop_result(step).logits.argmax(-1))
        labels.append(batch.labels)
    return torch.cat(predictions), torch.cat(labels)


def train_split_secure(config: RunConfig, train: TokenizedDataset, test: TokenizedDataset,
                       num_classes: int, progress: bool = True) -> dict:
    """Secure split training in process: client, cloud and dealer parties (docs/secure.md).

    Besides the plain run's keys it reports the label protection, the mean client->cloud
    messages per training step (``rounds_per_step``: each is one round trip, the cloud's
    reply included), messages and bytes per step in each direction, and the dealer's bytes.
    Evaluation runs the secure forward with the logits opened to the client only.
    """
    if config.activation != "quad":
        raise ConfigError("activation: secure mode evaluates the adapters in 2PC and needs 'quad'")
    generator = seed_everything(config.seed)
    device = select_device(config.device)
    parts = build_split(config.model, num_classes, config.head_rank, config.tail_bottleneck,
                        config.activation, config.seed, config.tail_input,
                        adapter_random(config.insecure_reproducible_init, config.seed))
    body_before = parts.body.fingerprint()
    dealer = SecureDealerParty()
    # in process the run config is the cloud's too: its opt-in is the cloud's permission
    cloud = SecureCloudParty(parts.body, dealer.public, device,
                             allow_reproducible_init=config.insecure_reproducible_init)
    steps_per_epoch = -(-len(train) // config.batch_size)
    client = SecureClientParty("tenant-0", parts.embedder, parts.head, parts.tail, config,
                               steps_per_epoch * config.epochs)
    transport = SecureLocalTransport(cloud, dealer)
    transport.connect(client)
    clock = CpuClock()
    history: list[float] = []
    costs = []
    started = time.perf_counter()
    for epoch in range(config.epochs):
        bar = tqdm(train.batches(config.batch_size, True, generator), total=steps_per_epoch,
                   desc=f"split-secure epoch {epoch + 1}/{config.epochs}", disable=not progress)
        losses = []
        for batch in bar:
            step = transport.run_step(client, batch, train=True, client_clock=clock.measure)
            costs.append(transport.last_step)
            losses.append(client.pop_result(step).loss)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history.append(sum(losses) / len(losses))
    predictions, labels = [], []
    for batch in test.batches(config.batch_size, shuffle=False):
        step = transport.run_step(client, batch, train=False, client_clock=clock.measure)
        predictions.append(client.pop_result(step).logits.argmax(-1))
        labels.append(batch.labels)
    predicted, truth = torch.cat(predictions), torch.cat(labels)
    if parts.body.fingerprint() != body_before:
        raise AssertionError("the body changed during training; it must stay frozen")
    count = max(1, len(costs))
    traffic = transport.traffic
    return {
        "test_accuracy": accuracy(predicted, truth),
        "test_macro_f1": macro_f1(predicted, truth, num_classes),
        "train_loss_history": history,
        "wall_seconds": time.perf_counter() - started,
        "client_cpu_seconds": clock.seconds,
        "bytes_client_to_cloud": traffic.bytes_client_to_cloud,
        "bytes_cloud_to_client": traffic.bytes_cloud_to_client,
        "label_protection": config.label_protection,
        "rounds_per_step": sum(c.messages_client_to_cloud for c in costs) / count,
        "messages_per_step_cloud_to_client": sum(c.messages_cloud_to_client for c in costs) / count,
        "bytes_per_step_client_to_cloud": sum(c.bytes_client_to_cloud for c in costs) / count,
        "bytes_per_step_cloud_to_client": sum(c.bytes_cloud_to_client for c in costs) / count,
        "bytes_dealer_to_cloud": traffic.bytes_dealer_to_cloud,
    }
