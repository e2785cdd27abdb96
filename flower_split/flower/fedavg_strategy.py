"""The FedAvg-LoRA family of baselines: Flower's own strategies, instrumented for comparison.

The averaging, node sampling, message construction and reply validation are Flower's
(:class:`flwr.serverapp.strategy.FedAvg` and :class:`~flwr.serverapp.strategy.FedProx`, weighted
by ``num-examples``). The subclasses here only

* record, per round, what each tenant reported before Flower aggregates it: the train loss and
  steps of every tenant, and each tenant's accuracy and macro-F1 on its own test split (the
  example-weighted mean of those is exactly Flower's weighted aggregate). Reports go to
  ``on_report``;
* stop on a plateau (:class:`PlateauStop`): once it fires, the remaining rounds of Flower's loop
  send no message (``num_rounds`` is the maximum);
* personalise (:meth:`personalize`): after the rounds, every tenant fine-tunes the final global
  model on its own rows and reports the fine-tuned model's scores (``train.personalize``);
* :class:`LocalOnlyLora`: Flower's ``FedAvg`` message flow with the averaging taken out, each
  tenant training its own model (a reference row: what a tenant reaches alone);
* resume (:meth:`state_dict` / :meth:`load_state_dict`, ``round_offset``): a ServerApp that
  resumes after round ``k`` (:mod:`flower_split.flower.fedavg_checkpoint`) runs Flower's loop for
  the remaining rounds, and the strategy numbers them ``k + 1, ...``, so the tenants' learning
  rate schedule, batch order and the reports go on where they stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from logging import INFO
from typing import Any, Callable, Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from flower_split.flower.fedavg_reports import (
    FedAvgEvalReport, FedAvgHistory, FedAvgRoundReport, GlobalEvalReport, PersonalizedEvalReport, PlateauStop, Report,
)

TENANT_KEY = "partition-id"
PERSONALIZE_TYPE = "train.personalize"


def _aggregate_without_tenant(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted aggregation, minus the (meaningless when averaged) tenant id."""
    metrics = aggregate_metricrecords(records, weight_key)
    if TENANT_KEY in metrics:
        del metrics[TENANT_KEY]
    return metrics


def tenant_order(reply: Message) -> tuple[int, int]:
    """Sort key of a reply: by the tenant's ``partition-id``, error replies last. Flower sums the
    weighted arrays in reply order, and float addition is not associative, so a fixed order makes a
    round's average the same whatever order the replies arrived in (a resumed run included)."""
    tenant = None if reply.has_error() else _partition_id(_metrics(reply).get(TENANT_KEY))
    return (0, tenant) if tenant is not None else (1, reply.metadata.src_node_id)


def _metrics(reply: Message) -> MetricRecord:
    """The metrics of a successful reply (its first MetricRecord; empty if it has none)."""
    return next(iter(reply.content.metric_records.values()), MetricRecord())


def _partition_id(value: object) -> int | None:
    """A reply's ``partition-id`` as an int; None when it is missing or not a whole number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


class _LoraReports:
    """Per-tenant reports, evaluation schedule, plateau stop and personalisation (a mixin for
    Flower's strategies: ``class X(_LoraReports, FedAvg)``).

    Tenants are named ``tenant-<partition-id>`` from the ``partition-id`` in their replies.
    Evaluation runs after the rounds :meth:`evaluates` names (every ``eval_every`` rounds and
    the last; round 0 only with ``eval_initial``), both Flower's client-side evaluate round and
    the ServerApp's ``evaluate_fn`` (which should return None when it is not due).
    """

    run_name = "fedavg-lora"

    def __init__(self, min_nodes: int, on_report: Callable[[Report], None] | None = None,
                 num_rounds: int = 1, eval_every: int = 1, eval_initial: bool = False,
                 plateau: PlateauStop | None = None, **strategy: Any) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_nodes,  # type: ignore[call-arg]
                         min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes,
                         train_metrics_aggr_fn=_aggregate_without_tenant,
                         evaluate_metrics_aggr_fn=_aggregate_without_tenant, **strategy)
        self.on_report = on_report
        self.num_rounds = num_rounds
        self.eval_every = eval_every
        self.eval_initial = eval_initial
        self.plateau = plateau or PlateauStop(0, 0.0)
        self.history = FedAvgHistory()
        self._tenant_of: dict[int, str] = {}
        self._started = 0.0
        self.round_offset = 0  # rounds completed before Flower's loop started (a resumed run)

    # -- saved state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The history and plateau state (plain values; the global model is the caller's to save)."""
        history = self.history
        return {"rounds": [asdict(r) for r in history.rounds],
                "evaluations": [asdict(r) for r in history.evaluations],
                "global_evaluations": [asdict(r) for r in history.global_evaluations],
                "stopped_after": history.stopped_after,
                "plateau": {"best": self.plateau.best, "since_best": self.plateau.since_best}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up :meth:`state_dict`'s history and plateau state (KeyError / TypeError if malformed)."""
        self.history = FedAvgHistory(
            rounds=[FedAvgRoundReport(**r) for r in state["rounds"]],
            evaluations=[FedAvgEvalReport(**r) for r in state["evaluations"]],
            global_evaluations=[GlobalEvalReport(**r) for r in state["global_evaluations"]],
            stopped_after=state["stopped_after"])
        self.plateau.best = state["plateau"]["best"]
        self.plateau.since_best = int(state["plateau"]["since_best"])

    # -- schedule --------------------------------------------------------------------------------

    @property
    def stopped_after(self) -> int | None:
        return self.history.stopped_after

    def active(self, server_round: int) -> bool:
        """Whether round ``server_round`` still runs (not after a plateau stop)."""
        return self.stopped_after is None or server_round <= self.stopped_after

    def final(self, server_round: int) -> bool:
        return server_round == self.num_rounds or server_round == self.stopped_after

    def evaluates(self, server_round: int) -> bool:
        """Whether the model after ``server_round`` (0: the initial one) is evaluated."""
        if server_round == 0:
            return self.eval_initial
        if not self.active(server_round):
            return False
        return self.final(server_round) or bool(self.eval_every and server_round % self.eval_every == 0)

    # -- reports ---------------------------------------------------------------------------------

    def _report(self, report: Report) -> None:
        if isinstance(report, PersonalizedEvalReport):
            self.history.personalized = report
        elif isinstance(report, FedAvgRoundReport):
            self.history.rounds.append(report)
        elif isinstance(report, FedAvgEvalReport):
            self.history.evaluations.append(report)
        else:
            self.history.global_evaluations.append(report)
        if self.on_report:
            self.on_report(report)

    def name(self, node: int) -> str:
        return self._tenant_of.get(node, f"node-{node}")

    def _tenant_metrics(self, replies: list[Message],
                        failures: dict[str, str]) -> Iterator[tuple[str, MetricRecord]]:
        """(tenant, metrics) of each successful reply; error replies go into ``failures``."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                failures[self.name(node)] = reply.error.reason
                continue
            metrics = _metrics(reply)
            tenant = _partition_id(metrics.get(TENANT_KEY))
            if tenant is not None:
                self._tenant_of[node] = f"tenant-{tenant}"
            yield self.name(node), metrics

    def _tally_evaluation(self, server_round: int, replies: list[Message],
                          kind: type[FedAvgEvalReport] = FedAvgEvalReport, **extra: Any) -> FedAvgEvalReport:
        per_tenant, per_tenant_f1, counts, failures = {}, {}, {}, {}
        correct, f1_sum = 0.0, 0.0
        for tenant, metrics in self._tenant_metrics(replies, failures):
            counts[tenant] = int(metrics.get("num-examples", 0))
            if counts[tenant]:
                per_tenant[tenant] = float(metrics.get("accuracy", 0.0))
                per_tenant_f1[tenant] = float(metrics.get("macro-f1", 0.0))
                correct += per_tenant[tenant] * counts[tenant]
                f1_sum += per_tenant_f1[tenant] * counts[tenant]
        total = sum(counts.values())
        return kind(server_round=server_round, accuracy=correct / total if total else None,
                    macro_f1=f1_sum / total if total else None, per_tenant=per_tenant,
                    per_tenant_f1=per_tenant_f1, num_examples=counts, failures=failures,
                    wall_seconds=time.perf_counter() - self._started, **extra)

    # -- Flower's strategy interface ---------------------------------------------------------------

    # Flower's loop counts its own rounds from 1; the run's round is ``round_offset`` more.

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        server_round += self.round_offset
        if not self.active(server_round):
            return []
        return self._configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        server_round += self.round_offset
        if not self.evaluates(server_round):
            return []
        return self._configure_evaluate(server_round, arrays, config, grid)

    def _configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def _configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def _aggregate_arrays(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = sorted(replies, key=tenant_order)
        server_round += self.round_offset
        if not self.active(server_round):
            return None, None
        losses, steps, failures = {}, {}, {}
        loss_sum, examples = 0.0, 0
        for tenant, metrics in self._tenant_metrics(replies, failures):
            count = int(metrics.get("num-examples", 0))
            losses[tenant] = float(metrics.get("train-loss", 0.0))
            steps[tenant] = int(metrics.get("steps", 0))
            if count and steps[tenant]:
                loss_sum += losses[tenant] * count
                examples += count
        arrays, aggregated = self._aggregate_arrays(server_round, replies)
        report = FedAvgRoundReport(
            server_round=server_round, tenants=sorted(losses), failures=failures,
            train_loss=loss_sum / examples if examples else None, num_examples=examples,
            per_tenant_loss=losses, steps=steps, wall_seconds=time.perf_counter() - self._started)
        log(INFO, "%s round %d: train loss %s over %d examples, %d tenants (%d failed)", self.run_name,
            server_round, "n/a" if report.train_loss is None else f"{report.train_loss:.4f}", examples,
            len(losses), len(failures))
        self._report(report)
        return arrays, aggregated

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = sorted(replies, key=tenant_order)
        server_round += self.round_offset
        if not self.evaluates(server_round):
            return None
        report = self._tally_evaluation(server_round, replies)
        aggregated = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        log(INFO, "%s evaluation after round %d: per-tenant accuracy %s (%s)", self.run_name, server_round,
            "n/a" if report.accuracy is None else f"{report.accuracy:.4f}",
            ", ".join(f"{t} {a:.3f}" for t, a in sorted(report.per_tenant.items())))
        self._report(report)
        if server_round > 0 and self.plateau.update(report.accuracy) and server_round < self.num_rounds:
            self.history.stopped_after = server_round
            log(INFO, "%s: per-tenant accuracy has not improved by more than %.2f points for %d evaluations "
                "(best %.4f); no more rounds after round %d", self.run_name, 100 * self.plateau.min_delta,
                self.plateau.patience, self.plateau.best, server_round)
        return aggregated

    def report_global(self, report: GlobalEvalReport) -> None:
        """Record a ServerApp-side evaluation on the global test set."""
        self._report(report)

    # -- personalisation -----------------------------------------------------------------------

    def personalize(self, grid: Grid, arrays: ArrayRecord, epochs: int, timeout: float) -> PersonalizedEvalReport:
        """Every tenant fine-tunes ``arrays`` for ``epochs`` on its own rows and reports its scores.

        The messages are Flower's evaluate messages (sampling, ``server-round``) sent as
        ``train.personalize``; the replies carry metrics only.
        """
        server_round = (self.stopped_after or self.num_rounds) + 1
        config = ConfigRecord({"personalize-epochs": epochs})
        messages = [Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=PERSONALIZE_TYPE)
                    for m in super().configure_evaluate(server_round, arrays, config, grid)]  # type: ignore[misc]
        self._started = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        train_examples = {}
        for tenant, metrics in self._tenant_metrics(replies, {}):
            train_examples[tenant] = int(metrics.get("train-examples", 0))
        report = self._tally_evaluation(server_round, replies, PersonalizedEvalReport, epochs=epochs,
                                        train_examples=train_examples)
        log(INFO, "%s personalised (%d local epochs): per-tenant accuracy %s", self.run_name, epochs,
            "n/a" if report.accuracy is None else f"{report.accuracy:.4f}")
        self._report(report)
        return report


class FedAvgLora(_LoraReports, FedAvg):
    """Flower's ``FedAvg`` over all connected tenants, with per-tenant reports."""


class FedProxLora(_LoraReports, FedProx):
    """Flower's ``FedProx`` (``proximal_mu`` sent to the clients in the train config, which add
    the proximal term to their loss), with per-tenant reports."""

    run_name = "fedprox-lora"


class LocalOnlyLora(_LoraReports, FedAvg):
    """Each tenant trains its own model; nothing is ever averaged.

    Flower's ``FedAvg`` message flow with ``local-only`` in the train and evaluate configs: the
    first training round carries the common initial model, later messages carry no arrays (the
    tenants keep their own models in their node state), replies carry metrics only, and
    :meth:`aggregate_train` returns no arrays, so Flower's global model stays the initial one.
    """

    run_name = "local-lora"

    def _configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> Iterable[Message]:
        config["local-only"] = True
        return super()._configure_train(server_round, arrays if server_round == 1 else ArrayRecord(), config, grid)

    def _configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
        config["local-only"] = True
        return super()._configure_evaluate(server_round, ArrayRecord(), config, grid)

    def _aggregate_arrays(self, server_round: int,
                          replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = [reply.content for reply in replies if not reply.has_error()]
        return None, (self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None)

    def personalize(self, grid: Grid, arrays: ArrayRecord, epochs: int, timeout: float) -> PersonalizedEvalReport:
        raise ValueError("local-only tenants already train on their own rows only: nothing to personalise")


__all__ = ["FedAvgEvalReport", "FedAvgHistory", "FedAvgLora", "FedAvgRoundReport", "FedProxLora",
           "GlobalEvalReport", "LocalOnlyLora", "PersonalizedEvalReport", "PlateauStop", "Report"]
