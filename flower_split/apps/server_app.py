"""Flower ServerApp of the cloud: the run's security backend builds the strategy around the body.

Builds the frozen body from ``run_config`` (see :mod:`flower_split.flower.settings` for the
keys, and ``[tool.flwr.app.config]`` in pyproject.toml for their defaults), asks the backend
of ``security`` for its strategy (:meth:`SecurityBackend.make_strategy`) and runs the rounds
and the evaluations. Afterwards it checks that the body did not move. Every round's and
evaluation's report goes to the log, to the optional ``on_report`` callback, and (as
MetricRecords ``round-N`` / ``eval-N``) into the ServerApp's ``context.state``.

``context.state`` is what a simulation returns to its caller; a deployment (flwr 1.41)
discards it. So with run-config ``results-dir`` the ServerApp meters its grid and writes
``results-dir/results.json`` when the run ends (:func:`run_recorded`; the format of
``flower-split simulate``, :func:`flower_split.flower.results.run_entry`, with
``"runtime": "deployment"``; client CPU figures come from tenant workers' cost meters, none
without workers).

With run config ``channel-address`` the grid is a :class:`ChannelGrid`: messages to nodes
whose tenant worker joins the ServerApp's direct channel bypass Flower's polling
(:mod:`flower_split.flower.direct_channel`).
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO
from typing import Any, Callable, Mapping

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from flower_split.backends import backend_for
from flower_split.config import ConfigError
from flower_split.flower.cloud_state import cloud_checkpoint
from flower_split.flower.direct_channel import ChannelGrid
from flower_split.flower.results import Collector, run_entry
from flower_split.flower.metering import peak_rss_bytes
from flower_split.flower.settings import settings_from_run_config, shared_run_name
from flower_split.flower.sharing_server import make_sharing
from flower_split.flower.strategy import Report
from flower_split.flower.strategy_utils import SplitResult
from flower_split.model import load_encoder, split_encoder
from flower_split.state.results import write_results
from flower_split.train.runtime import select_device, seed_everything


def run_cloud(grid: Grid, run_config: Mapping[str, Any],
              on_report: Callable[[Report], None] | None = None, run_id: int = 0) -> SplitResult:
    """Build the body and the strategy from ``run_config``, run every round, evaluate.

    With run config ``state-dir`` the strategy is saved at every safe point and a saved one
    of the same session is resumed (:mod:`flower_split.flower.cloud_state`)."""
    config, settings = settings_from_run_config(run_config)
    backend = backend_for(config, settings)
    seed_everything(config.seed)
    device = select_device(config.device)
    encoder = load_encoder(config.model, seed=config.seed)
    _, body = split_encoder(encoder)
    fingerprint = body.fingerprint()
    strategy = backend.make_strategy(body, device, settings)
    strategy.sharing = make_sharing(config.security, settings.share, settings.share_threshold, settings.reply_timeout)
    checkpoint = cloud_checkpoint(settings, run_id, backend.name, fingerprint)
    first_round = 1
    if checkpoint is not None:
        first_round = checkpoint.resume(strategy) + 1
        strategy.checkpoint = lambda completed: checkpoint.save(strategy, completed)
    if settings.predict:
        if first_round == 1:
            raise ConfigError("predict: needs the state-dir and session of a trained run (no saved cloud state found "
                              f"under state-dir {settings.state_dir!r}, session {settings.session!r})")
        log(INFO, "flower-split cloud (%s): predictions with the state of round %d", backend.name, first_round - 1)
        return strategy.predict(grid, first_round - 1, on_report)
    if first_round > settings.num_server_rounds:
        raise ConfigError(f"session {settings.session!r} has completed {first_round - 1} rounds already: raise "
                          f"num-server-rounds (now {settings.num_server_rounds}) to train on, or set predict = true")
    log(INFO, "flower-split cloud (%s): model %s on %s, rounds %d..%d", backend.name, config.model, device,
        first_round, settings.num_server_rounds)
    result = strategy.start(grid, settings.num_server_rounds, settings.eval_every,
                            settings.eval_initial, on_report, first_round)
    if body.fingerprint() != fingerprint:
        raise AssertionError("the body changed during training; it must stay frozen")
    return result


def run_recorded(grid: Grid, run_config: Mapping[str, Any],
                 on_report: Callable[[Report], None] | None = None, run_id: int = 0) -> SplitResult:
    """:func:`run_cloud` on a metered grid; then ``results.json`` in run-config ``results-dir``."""
    config, settings = settings_from_run_config(run_config)
    name = shared_run_name(backend_for(config, settings).run_name(config), settings.share)
    collector = Collector(name, "split", settings, settings.min_nodes, progress=False)

    def collect(report: Report) -> None:
        collector.on_report(report)
        if on_report is not None:
            on_report(report)

    started = time.perf_counter()
    result = run_cloud(collector.wrap(grid), run_config, collect, run_id)
    collector.collected.server_peak_rss_bytes = peak_rss_bytes()  # a deployment's ServerApp has its own process
    tenants = {t for r in result.rounds for t in r.tenants} | {t for e in result.evaluations for t in e.per_tenant}
    entry = run_entry(name, "split", config, settings, None, len(tenants), collector.collected,
                      time.perf_counter() - started)
    entry["runtime"] = "deployment"
    path = write_results(settings.results_dir, [entry])
    log(INFO, "flower-split cloud: results of %d rounds written to %s", len(result.rounds), path.resolve())
    return result


def _store(context: Context, result: SplitResult) -> None:
    """Keep the per-round numbers in the ServerApp's context (Flower returns it to the caller)."""
    for report in result.rounds:
        values = {k: v for k, v in dataclasses.asdict(report).items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        values["round-trips-per-step"] = report.round_trips_per_step
        values.update({f"stopped/{tenant}": stop for tenant, stop in report.stopped.items()})
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
        values = {**dict(context.run_config), **extra}
        settings = settings_from_run_config(values)[1]
        run = run_recorded if settings.results_dir else run_cloud
        if not settings.channel_address:
            _store(context, run(grid, values, on_report, context.run_id))
            return
        channel = ChannelGrid(grid, settings.channel_address, settings.channel_advertise)
        try:
            _store(context, run(channel, values, on_report, context.run_id))
        finally:
            channel.close()

    return server_app


app = make_server_app()
