"""FedAvg-LoRA baseline: Flower's own ``FedAvg`` (Message API), instrumented for comparison.

The averaging, node sampling, message construction and reply validation are Flower's
(:class:`flwr.serverapp.strategy.FedAvg`, weighted by ``num-examples``). This subclass only
records, per round, what each tenant reported before Flower aggregates it: the train loss and
steps of every tenant, and each tenant's accuracy on its own test split (the example-weighted
mean of those is exactly Flower's weighted aggregate). Reports go to ``on_report``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO
from typing import Callable, Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

TENANT_KEY = "partition-id"


@dataclass
class FedAvgRoundReport:
    """One training round."""

    server_round: int
    tenants: list[str]
    failures: dict[str, str]
    train_loss: float | None
    num_examples: int
    per_tenant_loss: dict[str, float]
    steps: dict[str, int]
    wall_seconds: float

    @property
    def round_trips_per_step(self) -> float:
        """One train round trip per round, over the mean optimizer steps a tenant took in it."""
        mean_steps = sum(self.steps.values()) / len(self.steps) if self.steps else 0.0
        return 1.0 / mean_steps if mean_steps else 0.0


@dataclass
class FedAvgEvalReport:
    """The global model on each tenant's own test split (example-weighted means over tenants)."""

    server_round: int
    accuracy: float | None
    macro_f1: float | None
    per_tenant: dict[str, float]
    per_tenant_f1: dict[str, float]
    num_examples: dict[str, int]
    failures: dict[str, str]
    wall_seconds: float


@dataclass
class GlobalEvalReport:
    """The global model on the whole (sampled) test set, evaluated by the ServerApp."""

    server_round: int
    accuracy: float
    macro_f1: float
    num_examples: int


@dataclass
class FedAvgHistory:
    rounds: list[FedAvgRoundReport] = field(default_factory=list)
    evaluations: list[FedAvgEvalReport] = field(default_factory=list)
    global_evaluations: list[GlobalEvalReport] = field(default_factory=list)


Report = FedAvgRoundReport | FedAvgEvalReport | GlobalEvalReport


def _aggregate_without_tenant(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted aggregation, minus the (meaningless when averaged) tenant id."""
    metrics = aggregate_metricrecords(records, weight_key)
    if TENANT_KEY in metrics:
        del metrics[TENANT_KEY]
    return metrics


class FedAvgLora(FedAvg):
    """Flower's ``FedAvg`` over all connected tenants, with per-tenant reports.

    Tenants are named ``tenant-<partition-id>`` from the ``partition-id`` in their replies.
    Evaluation runs after the rounds :meth:`evaluates` names (every ``eval_every`` rounds and
    the last; round 0 only with ``eval_initial``), both Flower's client-side evaluate round and
    the ServerApp's ``evaluate_fn`` (which should return None when it is not due).
    """

    def __init__(self, min_nodes: int, on_report: Callable[[Report], None] | None = None,
                 num_rounds: int = 1, eval_every: int = 1, eval_initial: bool = False) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_nodes,
                         min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes,
                         train_metrics_aggr_fn=_aggregate_without_tenant,
                         evaluate_metrics_aggr_fn=_aggregate_without_tenant)
        self.on_report = on_report
        self.num_rounds = num_rounds
        self.eval_every = eval_every
        self.eval_initial = eval_initial
        self.history = FedAvgHistory()
        self._tenant_of: dict[int, str] = {}
        self._started = 0.0

    def _report(self, report: Report) -> None:
        if isinstance(report, FedAvgRoundReport):
            self.history.rounds.append(report)
        elif isinstance(report, FedAvgEvalReport):
            self.history.evaluations.append(report)
        else:
            self.history.global_evaluations.append(report)
        if self.on_report:
            self.on_report(report)

    def name(self, node: int) -> str:
        return self._tenant_of.get(node, f"node-{node}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def evaluates(self, server_round: int) -> bool:
        """Whether the model after ``server_round`` (0: the initial one) is evaluated."""
        if server_round == 0:
            return self.eval_initial
        return server_round == self.num_rounds or bool(self.eval_every and server_round % self.eval_every == 0)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        if not self.evaluates(server_round):
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _tenant_metrics(self, replies: list[Message],
                        failures: dict[str, str]) -> Iterator[tuple[str, MetricRecord]]:
        """(tenant, metrics) of each successful reply; error replies go into ``failures``."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures[self.name(node)] = reply.error.reason
                continue
            metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
            if TENANT_KEY in metrics:
                self._tenant_of[node] = f"tenant-{int(metrics[TENANT_KEY])}"
            yield self.name(node), metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        losses, steps, failures = {}, {}, {}
        loss_sum, examples = 0.0, 0
        for tenant, metrics in self._tenant_metrics(replies, failures):
            count = int(metrics.get("num-examples", 0))
            losses[tenant] = float(metrics.get("train-loss", 0.0))
            steps[tenant] = int(metrics.get("steps", 0))
            if count and steps[tenant]:
                loss_sum += losses[tenant] * count
                examples += count
        arrays, aggregated = super().aggregate_train(server_round, replies)
        report = FedAvgRoundReport(
            server_round=server_round, tenants=sorted(losses), failures=failures,
            train_loss=loss_sum / examples if examples else None, num_examples=examples,
            per_tenant_loss=losses, steps=steps, wall_seconds=time.perf_counter() - self._started)
        log(INFO, "fedavg-lora round %d: train loss %s over %d examples, %d tenants (%d failed)", server_round,
            "n/a" if report.train_loss is None else f"{report.train_loss:.4f}", examples, len(losses), len(failures))
        self._report(report)
        return arrays, aggregated

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if not self.evaluates(server_round):
            return None
        per_tenant, per_tenant_f1, counts, failures = {}, {}, {}, {}
        correct, f1_sum = 0.0, 0.0
        for tenant, metrics in self._tenant_metrics(replies, failures):
            counts[tenant] = int(metrics.get("num-examples", 0))
            if counts[tenant]:
                per_tenant[tenant] = float(metrics.get("accuracy", 0.0))
                per_tenant_f1[tenant] = float(metrics.get("macro-f1", 0.0))
                correct += per_tenant[tenant] * counts[tenant]
                f1_sum += per_tenant_f1[tenant] * counts[tenant]
        aggregated = super().aggregate_evaluate(server_round, replies)
        total = sum(counts.values())
        report = FedAvgEvalReport(
            server_round=server_round, accuracy=correct / total if total else None,
            macro_f1=f1_sum / total if total else None, per_tenant=per_tenant,
            per_tenant_f1=per_tenant_f1, num_examples=counts, failures=failures,
            wall_seconds=time.perf_counter() - self._started)
        log(INFO, "fedavg-lora evaluation after round %d: per-tenant accuracy %s (%s)", server_round,
            "n/a" if report.accuracy is None else f"{report.accuracy:.4f}",
            ", ".join(f"{t} {a:.3f}" for t, a in sorted(per_tenant.items())))
        self._report(report)
        return aggregated

    def report_global(self, report: GlobalEvalReport) -> None:
        """Record a ServerApp-side evaluation on the global test set."""
        self._report(report)
