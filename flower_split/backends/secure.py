"""Security level ``secure`` (split-secure): secret-shared adapters in 2PC, protected labels.

The adapters are additively shared between tenant and cloud and evaluated with Beaver
triples from a dealer; the loss is computed under the run's label protection
(:mod:`flower_split.protocol.labels`). Each party updates its own half with its gradient
share, so only a linear update rule (SGD with momentum) and a polynomial activation are
exact: :meth:`SecureBackend.validate` refuses anything else. docs/secure.md is the protocol.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from flower_split.audit import CloudViewRecorder
from flower_split.backends.base import SecurityBackend, audit_hook
from flower_split.backends.saved import Restored, SavedRun, SaveTo
from flower_split.backends.secure_state import restore_secure, save_secure
from flower_split.config import LABEL_PROTECTIONS, ConfigError, RunConfig
from flower_split.data import TokenizedDataset
from flower_split.flower import secure_handlers
from flower_split.flower.dealer_link import ColocatedDealer, DealerLink, NodeDealer
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.settings import FlowerSettings
from flower_split.flower.strategy import SplitStrategyBase
from flower_split.flower.tenant import Handler
from flower_split.model import Body, adapter_random, build_split, log_label_frequencies
from flower_split.protocol.dealer_identity import load_pinned
from flower_split.protocol.labels import label_protection
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.protocol.input_noise import input_noise_summary
from flower_split.train.driver import run_in_process
from flower_split.train.runtime import select_device, seed_everything
from flower_split.train.sessions import SecureSession
from flower_split.transport import SecureLocalTransport


class SecureBackend(SecurityBackend):
    """Split-secure: client, cloud and dealer parties; one step in flight per tenant."""

    name = "secure"

    def validate(self, config: RunConfig) -> None:
        if config.optimizer != "sgd":
            raise ConfigError("optimizer: secure mode updates each half with its own gradient share, "
                              "which only a linear rule (sgd with momentum) keeps exact; use 'sgd'")
        if config.activation != "quad":
            raise ConfigError("activation: secure mode evaluates the adapters in 2PC and needs 'quad'")
        if config.prior_offset and label_protection(config.label_protection).logits_to_cloud:
            raise ConfigError(f"prior_offset: label protection {config.label_protection!r} computes the loss on the "
                              "cloud, which would need the tenant's label frequencies in the clear; use "
                              "label_protection = 'client' (the offset is added where only the tenant sees the logits)")

    def validate_flower(self, config: RunConfig, settings: FlowerSettings) -> None:
        super().validate_flower(config, settings)
        if settings.target_loss:
            raise ConfigError("target-loss: in secure mode each tenant sets its own (node config target-loss); "
                              "a run-wide target, the cloud's choice, would let it search the tenants' losses")
        protection = label_protection(config.label_protection)
        if settings.he_key_rotation_every and not protection.ckks_keys:
            raise ConfigError(f"he-key-rotation-every: label protection {protection.name!r} holds no CKKS keys "
                              "to rotate; set it to 0")
        if settings.expected_dealer_key:
            try:
                load_pinned(settings.expected_dealer_key)
            except ValueError as exc:
                raise ConfigError(f"expected-dealer-key: {exc}") from exc
        if config.insecure_reproducible_init and not settings.allow_insecure_reproducible_init:
            raise ConfigError("insecure-reproducible-init: the cloud refuses tenants whose head starts from a public "
                              "seed unless allow-insecure-reproducible-init = true (benchmarks only)")

    def run_name(self, config: RunConfig) -> str:
        return f"split-secure-{config.label_protection}"

    def variants(self) -> dict[str, dict[str, Any]]:
        # the secure runs skip the whole-test-set evaluation (ten times the per-tenant one's cost)
        return {f"split-secure-{name}": {"security": self.name, "label_protection": name, "global_eval": False}
                for name in LABEL_PROTECTIONS}

    def train_in_process(self, config: RunConfig, train: TokenizedDataset, test: TokenizedDataset,
                         num_classes: int, progress: bool = True, recorder: CloudViewRecorder | None = None,
                         save: SaveTo | None = None) -> dict:
        self.validate(config)
        generator = seed_everything(config.seed)
        device = select_device(config.device)
        parts = build_split(config.model, num_classes, config.head_rank, config.tail_bottleneck,
                            config.activation, config.seed, config.tail_input,
                            adapter_random(config.insecure_reproducible_init, config.seed),
                            log_label_frequencies(train.labels, num_classes) if config.prior_offset else None)
        dealer = SecureDealerParty()
        # in process the run config is the cloud's too: its opt-in is the cloud's permission
        cloud = SecureCloudParty(parts.body, dealer.public, device,
                                 allow_reproducible_init=config.insecure_reproducible_init)
        hook = audit_hook(config, num_classes, cloud, recorder)
        steps = -(-len(train) // config.batch_size) * config.epochs
        client = SecureClientParty("tenant-0", parts.embedder, parts.head, parts.tail, config, steps)
        transport = SecureLocalTransport(cloud, dealer)
        transport.connect(client)
        metrics = run_in_process(config, SecureSession(client, transport), parts.body, train, test, num_classes,
                                 generator, progress, "split-secure", hook)
        metrics.update(input_noise_summary(config, parts.embedder))
        if save is not None:
            save_secure(save.root, config, parts, client, cloud, dealer, save.label_names, steps)
        return metrics

    def restore(self, run: SavedRun, device: torch.device) -> Restored:
        return restore_secure(run, device)

    def make_strategy(self, body: Body, device: torch.device, settings: FlowerSettings) -> SplitStrategyBase:
        # the ServerApp holds no dealer secret unless the run explicitly co-locates it (insecure)
        pinned = load_pinned(settings.expected_dealer_key) if settings.expected_dealer_key else None
        dealer: DealerLink = (ColocatedDealer(SecureDealerParty()) if settings.insecure_colocated_dealer
                              else NodeDealer(settings.reply_timeout, pinned))
        cloud = SecureCloudParty(body, None, device, keep_graphs=settings.cloud_keep_graphs,
                                 allow_reproducible_init=settings.allow_insecure_reproducible_init)
        return SecureSplitStrategy(cloud, dealer, settings.local_steps, min_nodes=settings.min_nodes,
                                   reply_timeout=settings.reply_timeout, global_eval=settings.global_eval,
                                   he_key_rotation_every=settings.he_key_rotation_every,
                                   node_wait_timeout=settings.node_wait_timeout, step_pace=settings.step_pace)

    @property
    def handlers(self) -> Mapping[str, Handler]:
        return secure_handlers.HANDLERS
