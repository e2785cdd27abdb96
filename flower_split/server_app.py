"""Flower ServerApp of the cloud (security levels ``plain`` and ``secure``).

Builds the frozen body from ``run_config`` (see :func:`settings_from_run_config` for the keys,
and ``[tool.flwr.app.config]`` in pyproject.toml for their defaults), wraps it in a
:class:`CloudParty` (plain) or a :class:`SecureCloudParty` with a dealer (secure), and lets
:class:`strategies.split.SplitStrategy` / :class:`strategies.secure_split.SecureSplitStrategy`
run the rounds and the evaluations. Afterwards it checks that the body did not move. Every round's and evaluation's
report goes to the log, to the optional ``on_report`` callback, and (as MetricRecords
``round-N`` / ``eval-N``) into the ServerApp's ``context.state``.
"""

from __future__ import annotations

import dataclasses
from logging import INFO
from typing import Any, Callable, Mapping

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flower_split.model import load_encoder, split_encoder
from flower_split.protocol import CloudParty
from flower_split.train.runtime import select_device, seed_everything
from flower_split.transport.flower import settings_from_run_config
from strategies.split import EvalReport, RoundReport, SplitResult, SplitStrategy

Report = RoundReport | EvalReport


def run_cloud(grid: Grid, run_config: Mapping[str, Any],
              on_report: Callable[[Report], None] | None = None) -> SplitResult:
    """Build the body and the strategy from ``run_config``, run every round, evaluate."""
    config, settings = settings_from_run_config(run_config)
    seed_everything(config.seed)
    device = select_device(config.device)
    encoder = load_encoder(config.model, seed=config.seed)
    _, body = split_encoder(encoder)
    fingerprint = body.fingerprint()
    common = dict(local_steps=settings.local_steps, min_nodes=settings.min_nodes,
                  reply_timeout=settings.reply_timeout, global_eval=settings.global_eval)
    if config.security == "secure":
        from flower_split.protocol.secure_cloud import SecureCloudParty
        from flower_split.protocol.secure_dealer import SecureDealerParty
        from strategies.secure_split import SecureSplitStrategy

        dealer = SecureDealerParty()
        secure_cloud = SecureCloudParty(body, dealer.public, device, keep_graphs=settings.cloud_keep_graphs,
                                        allow_reproducible_init=settings.allow_insecure_reproducible_init)
        strategy: SplitStrategy = SecureSplitStrategy(
            secure_cloud, dealer, he_key_rotation_every=settings.he_key_rotation_every, **common)
    else:
        cloud = CloudParty(body, device, keep_graphs=settings.cloud_keep_graphs)
        strategy = SplitStrategy(cloud, micro_batches=settings.micro_batches, **common)
    log(INFO, "flower-split cloud (%s): model %s on %s, %d rounds", config.security, config.model, device,
        settings.num_server_rounds)
    result = strategy.start(grid, settings.num_server_rounds, settings.eval_every,
                            settings.eval_initial, on_report)
    if body.fingerprint() != fingerprint:
        raise AssertionError("the body changed during training; it must stay frozen")
    return result


def _store(context: Context, result: SplitResult) -> None:
    """Keep the per-round numbers in the ServerApp's context (Flower returns it to the caller)."""
    for report in result.rounds:
        values = {k: v for k, v in dataclasses.asdict(report).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        values["round-trips-per-step"] = report.round_trips_per_step
        context.state[f"round-{report.server_round}"] = MetricRecord(values)
    for report in result.evaluations:
        values = {"accuracy": report.accuracy if report.accuracy is not None else -1.0,
                  "macro-f1": report.macro_f1 if report.macro_f1 is not None else -1.0,
                  **{f"accuracy/{t}": a for t, a in report.per_tenant.items()}}
        name = "eval" if report.scope == "tenant" else "eval-global"
        context.state[f"{name}-{report.server_round}"] = MetricRecord(values)
    context.state["summary"] = ConfigRecord({"rounds": len(result.rounds)})


def make_server_app(overrides: Mapping[str, Any] | None = None,
                    on_report: Callable[[Report], None] | None = None) -> ServerApp:
    """The cloud's ServerApp; ``overrides`` take precedence over ``context.run_config``."""
    extra = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_cloud(grid, {**dict(context.run_config), **extra}, on_report)
        _store(context, result)

    return server_app


app = make_server_app()
