"""Flower ServerApp of the FedAvg-LoRA family (:mod:`flower_split.flower.fedavg_strategy`).

Builds the same :class:`LoraClassifier` as the tenants (seeded), sends its trainable parameters
as the initial global model, and runs the ``baseline``'s Flower strategy (``FedAvg``,
``FedProx`` or local-only) for ``num-server-rounds`` rounds of ``local-epochs`` each, or until
the plateau rule stops it. After the rounds the strategy evaluates (every ``eval-every`` rounds
and the last; before the first with ``eval-initial``) the tenants test the global model (local
only: their own) on their own test splits and, with ``global-eval``, the ServerApp tests the
global model on the whole sampled test set (the centralized baseline's test set; not for
local-only, which has no global model). With ``personalize-epochs``, every tenant then
fine-tunes the final global model on its own rows and is evaluated once more. With
``state-dir`` the ServerApp saves after every round and a new one with the same ``session``
resumes after the last saved round (:mod:`flower_split.flower.fedavg_checkpoint`).
"""

from __future__ import annotations

from logging import INFO
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from flower_split.data import TokenizedDataset
from flower_split.data.tenants import global_test_set
from flower_split.flower.fedavg_checkpoint import FedAvgCheckpoint, Resumable, fedavg_checkpoint
from flower_split.flower.fedavg_reports import FedAvgHistory, GlobalEvalReport, PlateauStop, Report
from flower_split.flower.fedavg_settings import FedAvgSettings, fedavg_settings_from_run_config
from flower_split.flower.fedavg_strategy import FedAvgLora, FedProxLora, LocalOnlyLora
from flower_split.flower.fedavg_training import FedAvgMessageError, load_trainable, trainable_state
from flower_split.flower.settings import FlowerSettings
from flower_split.model import load_tokenizer
from flower_split.state import StateError
from flower_split.train.centralized import LoraClassifier, predict_centralized
from flower_split.train.metrics import accuracy, macro_f1
from flower_split.train.runtime import select_device, seed_everything


def make_strategy(settings: FlowerSettings, fedavg: FedAvgSettings,
                  on_report: Callable[[Report], None] | None = None) -> FedAvgLora | FedProxLora | LocalOnlyLora:
    """The Flower strategy of ``fedavg.baseline``, with the run's schedule and plateau rule."""
    common = dict(min_nodes=settings.min_nodes, on_report=on_report, num_rounds=settings.num_server_rounds,
                  eval_every=settings.eval_every, eval_initial=settings.eval_initial,
                  plateau=PlateauStop(fedavg.plateau_patience, fedavg.plateau_delta))
    if fedavg.baseline == "fedprox":
        return FedProxLora(**common, proximal_mu=fedavg.proximal_mu)
    if fedavg.baseline == "local-only":
        return LocalOnlyLora(**common)
    return FedAvgLora(**common)


def _resumed(checkpoint: FedAvgCheckpoint | None, strategy: Any, model: LoraClassifier,
             journal: Resumable | None) -> tuple[int, ArrayRecord]:
    """(rounds completed, the global model to go on from): the saved ones when the session has a
    saved state (loaded into ``strategy`` and ``journal``), else (0, ``model``'s start)."""
    completed, saved = checkpoint.resume(strategy, journal) if checkpoint else (0, None)
    if saved is None:
        return completed, ArrayRecord(torch_state_dict=trainable_state(model))
    try:
        load_trainable(model, saved)
    except (FedAvgMessageError, KeyError, RuntimeError, ValueError) as exc:
        raise StateError(f"{checkpoint.directory if checkpoint else ''}: the saved global model does not fit "
                         f"this run's model ({exc})") from exc
    return completed, saved


def _check_trained(strategy: Any, server_round: int, checkpoint: FedAvgCheckpoint) -> None:
    """A round no tenant trained is not saved as completed: the run stops, the state saved after
    the round before stays (e.g. local-only tenants restarted without their mirrored models would
    otherwise overwrite a good state with rounds of failures)."""
    report = next((r for r in reversed(strategy.history.rounds) if r.server_round == server_round), None)
    if report is None or not report.tenants:
        failures = "; ".join(f"{t}: {why}" for t, why in sorted(report.failures.items())) if report else "no report"
        raise StateError(f"round {server_round}: no tenant trained ({failures}); not saved, the state in "
                         f"{checkpoint.directory} stays as it was after round {server_round - 1}")


def run_fedavg_cloud(grid: Grid, run_config: Mapping[str, Any],
                     on_report: Callable[[Report], None] | None = None, run_id: int = 0,
                     journal: Resumable | None = None) -> tuple[FedAvgHistory, Result]:
    """Run the baseline described by ``run_config``; return the per-round history and Flower's result.

    With ``state-dir`` the state after every round is saved (with ``journal``'s, the simulation's
    collector) and a saved state of the session is resumed first.
    """
    config, settings, fedavg = fedavg_settings_from_run_config(run_config)
    checkpoint = fedavg_checkpoint(settings, run_id, fedavg.run_name, run_config)
    seed_everything(config.seed)
    device = select_device(config.device)
    test = global_test_set(config)
    test_tok = TokenizedDataset(test, load_tokenizer(config.model), config.max_length)
    model = LoraClassifier(config.model, test.num_classes, config).to(device)
    strategy = make_strategy(settings, fedavg, on_report)
    has_global_model = not isinstance(strategy, LocalOnlyLora)
    if checkpoint is not None:
        checkpoint.check_writable()
    completed, initial = _resumed(checkpoint, strategy, model, journal)
    strategy.round_offset = completed
    remaining = 0 if strategy.stopped_after is not None else max(settings.num_server_rounds - completed, 0)

    def evaluate_global(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if completed and not flower_round:
            return None  # a resumed run: the saved round was evaluated before the save
        server_round = flower_round + completed
        metrics = _evaluate_global(server_round, arrays)
        if checkpoint is not None and server_round and strategy.active(server_round):
            _check_trained(strategy, server_round, checkpoint)
            checkpoint.save(strategy, server_round, arrays, journal)
        return metrics

    def _evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if not (strategy.evaluates(server_round) and settings.global_eval and has_global_model):
            return None
        load_trainable(model, arrays)
        predictions, labels = predict_centralized(model, test_tok, config.batch_size, device)
        report = GlobalEvalReport(server_round, accuracy(predictions, labels),
                                  macro_f1(predictions, labels, test.num_classes), len(labels))
        log(INFO, "%s global test after round %d: accuracy %.4f, macro-F1 %.4f", strategy.run_name,
            server_round, report.accuracy, report.macro_f1)
        strategy.report_global(report)
        return MetricRecord({"accuracy": report.accuracy, "macro-f1": report.macro_f1})

    log(INFO, "%s: model %s on %s, up to %d rounds of %d local epochs", strategy.run_name, config.model, device,
        settings.num_server_rounds, fedavg.local_epochs)
    if completed:
        log(INFO, "%s: rounds 1-%d were run before; Flower's rounds 1-%d below are rounds %d-%d", strategy.run_name,
            completed, remaining, completed + 1, completed + remaining)
    result = strategy.start(
        grid, initial, remaining, timeout=settings.reply_timeout,
        train_config=ConfigRecord({"local-epochs": fedavg.local_epochs}), evaluate_fn=evaluate_global)
    if fedavg.personalize_epochs:
        final = result.arrays if len(result.arrays) else initial
        strategy.personalize(grid, final, fedavg.personalize_epochs, settings.reply_timeout)
    return strategy.history, result


def make_fedavg_server_app(overrides: Mapping[str, Any] | None = None,
                           on_report: Callable[[Report], None] | None = None,
                           wrap_grid: Callable[[Grid], Grid] | None = None,
                           journal: Resumable | None = None) -> ServerApp:
    """The FedAvg-family ServerApp; ``overrides`` take precedence over ``context.run_config``;
    ``journal`` is saved and resumed with the strategy (:func:`run_fedavg_cloud`)."""
    extra = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        history, _ = run_fedavg_cloud(wrap_grid(grid) if wrap_grid else grid,
                                      {**dict(context.run_config), **extra}, on_report, context.run_id, journal)
        for report in history.evaluations:
            context.state[f"eval-{report.server_round}"] = MetricRecord(
                {"accuracy": report.accuracy if report.accuracy is not None else -1.0,
                 "macro-f1": report.macro_f1 if report.macro_f1 is not None else -1.0,
                 **{f"accuracy/{t}": a for t, a in report.per_tenant.items()}})

    return server_app


app = make_fedavg_server_app()
