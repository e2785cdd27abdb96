"""Flower ServerApp of the FedAvg-LoRA baseline (:class:`flower_split.flower.fedavg_strategy.FedAvgLora`).

Builds the same :class:`LoraClassifier` as the tenants (seeded), sends its trainable parameters
as the initial global model, and runs Flower's ``FedAvg`` for ``num-server-rounds`` rounds
of ``local-epochs`` each. After the rounds the strategy evaluates (every ``eval-every`` rounds
and the last; before the first with ``eval-initial``) the tenants test the global model on
their own test splits and, with ``global-eval``, the ServerApp tests it on the whole sampled
test set (the centralized baseline's test set).
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
from flower_split.flower.fedavg_client_app import fedavg_settings_from_run_config, load_trainable, trainable_state
from flower_split.model import load_tokenizer
from flower_split.train.centralized import LoraClassifier, predict_centralized
from flower_split.train.metrics import accuracy, macro_f1
from flower_split.train.runtime import select_device, seed_everything
from flower_split.flower.fedavg_strategy import FedAvgHistory, FedAvgLora, GlobalEvalReport, Report


def run_fedavg_cloud(grid: Grid, run_config: Mapping[str, Any],
                     on_report: Callable[[Report], None] | None = None) -> tuple[FedAvgHistory, Result]:
    """Run FedAvg-LoRA as described by ``run_config``; return the per-round history and Flower's result."""
    config, settings, fedavg = fedavg_settings_from_run_config(run_config)
    seed_everything(config.seed)
    device = select_device(config.device)
    test = global_test_set(config)
    test_tok = TokenizedDataset(test, load_tokenizer(config.model), config.max_length)
    model = LoraClassifier(config.model, test.num_classes, config).to(device)
    strategy = FedAvgLora(min_nodes=settings.min_nodes, on_report=on_report,
                          num_rounds=settings.num_server_rounds, eval_every=settings.eval_every,
                          eval_initial=settings.eval_initial)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if not (strategy.evaluates(server_round) and settings.global_eval):
            return None
        load_trainable(model, arrays)
        predictions, labels = predict_centralized(model, test_tok, config.batch_size, device)
        report = GlobalEvalReport(server_round, accuracy(predictions, labels),
                                  macro_f1(predictions, labels, test.num_classes), len(labels))
        log(INFO, "fedavg-lora global test after round %d: accuracy %.4f, macro-F1 %.4f", server_round,
            report.accuracy, report.macro_f1)
        strategy.report_global(report)
        return MetricRecord({"accuracy": report.accuracy, "macro-f1": report.macro_f1})

    log(INFO, "fedavg-lora: model %s on %s, %d rounds of %d local epochs", config.model, device,
        settings.num_server_rounds, fedavg.local_epochs)
    result = strategy.start(
        grid, ArrayRecord(torch_state_dict=trainable_state(model)), settings.num_server_rounds,
        timeout=settings.reply_timeout, train_config=ConfigRecord({"local-epochs": fedavg.local_epochs}),
        evaluate_fn=evaluate_global)
    return strategy.history, result


def make_fedavg_server_app(overrides: Mapping[str, Any] | None = None,
                           on_report: Callable[[Report], None] | None = None,
                           wrap_grid: Callable[[Grid], Grid] | None = None) -> ServerApp:
    """The FedAvg-LoRA ServerApp; ``overrides`` take precedence over ``context.run_config``."""
    extra = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        history, _ = run_fedavg_cloud(wrap_grid(grid) if wrap_grid else grid,
                                      {**dict(context.run_config), **extra}, on_report)
        for report in history.evaluations:
            context.state[f"eval-{report.server_round}"] = MetricRecord(
                {"accuracy": report.accuracy if report.accuracy is not None else -1.0,
                 "macro-f1": report.macro_f1 if report.macro_f1 is not None else -1.0,
                 **{f"accuracy/{t}": a for t, a in report.per_tenant.items()}})

    return server_app


app = make_fedavg_server_app()
