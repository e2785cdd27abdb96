"""Security level ``plain`` (split-plain): the split without cryptography, to measure what it costs.

The cloud sees the head output ``f`` and the gradient ``dL/dh`` in the clear and each tenant
reports its own loss and accuracy counts; nothing is protected (README, docs/PRIVACY.md).
"""

from __future__ import annotations

from typing import Mapping

import torch

from flower_split.audit import CloudViewRecorder
from flower_split.backends.base import SecurityBackend, audit_hook
from flower_split.backends.plain_state import restore_plain, save_plain
from flower_split.backends.saved import Restored, SavedRun, SaveTo
from flower_split.config import ConfigError, RunConfig
from flower_split.data import TokenizedDataset
from flower_split.flower import plain_handlers
from flower_split.flower.plain_strategy import SplitStrategy
from flower_split.flower.settings import FlowerSettings
from flower_split.flower.strategy import SplitStrategyBase
from flower_split.flower.tenant import Handler
from flower_split.model import Body, adapter_random, build_split, log_label_frequencies
from flower_split.protocol import ClientParty, CloudParty
from flower_split.protocol.input_noise import input_noise_summary
from flower_split.train.driver import run_in_process
from flower_split.train.runtime import select_device, seed_everything
from flower_split.train.sessions import PlainSession
from flower_split.transport import InProcessTransport


class PlainBackend(SecurityBackend):
    """Split-plain: :class:`ClientParty` / :class:`CloudParty`, three Flower stages per step."""

    name = "plain"

    def validate_flower(self, config: RunConfig, settings: FlowerSettings) -> None:
        super().validate_flower(config, settings)
        if settings.he_key_rotation_every:
            raise ConfigError("he-key-rotation-every: security 'plain' has no CKKS keys to rotate; set it to 0")
        if settings.simulated_dealer:
            raise ConfigError("simulated-dealer: security 'plain' has no dealer; set it to false")
        if settings.target_loss and config.label_dp_noise:
            raise ConfigError("target-loss: under label-DP a tenant keeps its (label-dependent) loss to itself, "
                              "so the strategy has none to stop it on; set target-loss = 0 or label-dp-noise = 0")
        if settings.target_loss and not settings.secure_metrics:
            raise ConfigError("target-loss: with secure-metrics = false a split-plain tenant keeps its loss to "
                              "itself, so the strategy has none to stop it on; set target-loss = 0")

    def train_in_process(self, config: RunConfig, train: TokenizedDataset, test: TokenizedDataset,
                         num_classes: int, progress: bool = True, recorder: CloudViewRecorder | None = None,
                         save: SaveTo | None = None) -> dict:
        generator = seed_everything(config.seed)
        device = select_device(config.device)
        parts = build_split(config.model, num_classes, config.head_rank, config.tail_bottleneck,
                            config.activation, config.seed, config.tail_input,
                            adapter_random(config.insecure_reproducible_init, config.seed),
                            log_label_frequencies(train.labels, num_classes) if config.prior_offset else None)
        steps = -(-len(train) // config.batch_size) * config.epochs
        client = ClientParty("tenant-0", parts.embedder, parts.head, parts.tail, config, steps, device)
        cloud = CloudParty(parts.body, device)
        hook = audit_hook(config, num_classes, cloud, recorder)
        session = PlainSession(client, InProcessTransport(cloud))
        metrics = run_in_process(config, session, parts.body, train, test, num_classes, generator, progress,
                                 "split", hook)
        metrics.update(input_noise_summary(config, parts.embedder))
        if save is not None:
            save_plain(save.root, config, parts, client, save.label_names, steps)
        return metrics

    def restore(self, run: SavedRun, device: torch.device) -> Restored:
        return restore_plain(run, device)

    def make_strategy(self, body: Body, device: torch.device, settings: FlowerSettings) -> SplitStrategyBase:
        cloud = CloudParty(body, device, keep_graphs=settings.cloud_keep_graphs)
        return SplitStrategy(cloud, settings.local_steps, micro_batches=settings.micro_batches,
                             min_nodes=settings.min_nodes, reply_timeout=settings.reply_timeout,
                             global_eval=settings.global_eval, target_loss=settings.target_loss or None,
                             node_wait_timeout=settings.node_wait_timeout, tenant_metrics=settings.secure_metrics)

    @property
    def handlers(self) -> Mapping[str, Handler]:
        return plain_handlers.HANDLERS
