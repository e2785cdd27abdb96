"""Reports and public helpers shared by the split strategies (plain and secure).

In the manner of Flower's ``strategy_utils``: what every strategy needs once — the round and
evaluation reports, the per-phase counters, the validation of a tenant's class counts and the
aggregation of per-tenant accuracy into one :class:`EvalReport` — lives here, public, so a
strategy for a new security level overrides its stages and reuses the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict

from flower_split.flower.contract import CLASS_COUNT_KEYS, MetricKey, RecordKey
from flower_split.protocol import ProtocolError
from flower_split.train.metrics import macro_f1_from_counts


@dataclass
class RoundReport:
    """What one training round did and cost."""

    server_round: int
    tenants: list[str]
    dropped: dict[str, str]
    train_loss: float | None
    num_examples: int
    steps: int
    round_trips: int
    flower_wait_seconds: float
    cloud_seconds: float
    wall_seconds: float
    dealer_seconds: float = 0.0  # secure only: the dealer's share of the ServerApp's time
    stopped: dict[str, int] = field(default_factory=dict)  # tenant -> round it reached target-loss
    label_dp_epsilon: dict[str, float] = field(default_factory=dict)  # tenant -> its label-DP epsilon so far
    sharing: Any = None  # the round's sharing phase (flower.sharing_server.ShareReport), None: no sharing

    @property
    def round_trips_per_step(self) -> float:
        """Flower round trips per micro-batch step (each step trains every tenant once)."""
        return self.round_trips / self.steps if self.steps else 0.0


@dataclass
class EvalReport:
    """Test accuracy and macro-F1 of every tenant's adapters (counts reported by the tenants).

    ``scope`` "tenant": each tenant on its own test split; ``accuracy`` / ``macro_f1`` are the
    example-weighted means over tenants (the headline metric). ``scope`` "global": each tenant
    on the whole sampled test set; ``accuracy`` / ``macro_f1`` are plain means over tenants.
    """

    server_round: int
    scope: str
    accuracy: float | None
    macro_f1: float | None
    per_tenant: dict[str, float]
    per_tenant_f1: dict[str, float]
    num_examples: dict[str, int]
    dropped: dict[str, str]
    round_trips: int
    flower_wait_seconds: float
    wall_seconds: float


@dataclass
class SplitResult:
    """History of a whole run."""

    rounds: list[RoundReport] = field(default_factory=list)
    evaluations: list[EvalReport] = field(default_factory=list)


@dataclass
class Exchange:
    """Counters of one phase (a training round or an evaluation)."""

    round_trips: int = 0
    wait: float = 0.0
    cloud: float = 0.0
    dealer: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


def class_counts(content: RecordDict) -> np.ndarray:
    """The per-class [tp, fp, fn] counts of an evaluation reply, as a [3, C] array (validated)."""
    record = content.get(RecordKey.METRICS)
    try:
        counts = np.asarray([list(record[key]) for key in CLASS_COUNT_KEYS], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"evaluation reply: metrics.tp/fp/fn: missing or not equal-length integer lists "
                            f"({exc})") from None
    if counts.ndim != 2 or (counts < 0).any():
        raise ProtocolError("evaluation reply: metrics.tp/fp/fn: expected non-negative counts")
    return counts


def weighted_mean(values: dict[str, float], weights: dict[str, int]) -> float | None:
    """Mean of ``values`` weighted by ``weights`` (None when there is nothing to average)."""
    total = sum(weights[t] for t in values)
    return sum(v * weights[t] for t, v in values.items()) / total if total else None


@dataclass
class EvalTally:
    """Per-node evaluation counts over the batches of one evaluation, and the report they make."""

    correct: dict[int, int] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    counts: dict[int, np.ndarray] = field(default_factory=dict)
    predicted: dict[int, int] = field(default_factory=dict)  # scope "predict": texts classified, no counts

    def add(self, node: int, content: RecordDict) -> bool:
        """Count one reply's metrics; False when the tenant reported no counts (it may keep them;
        a prediction reports only how many texts it classified, kept in ``predicted``).

        A malformed reply, or class counts whose number of classes changed, is a ProtocolError.
        """
        record = content.get(RecordKey.METRICS)
        if not isinstance(record, MetricRecord) or MetricKey.CORRECT not in record:
            done = record.get(MetricKey.NUM_EXAMPLES) if isinstance(record, MetricRecord) else None
            if isinstance(done, int) and not isinstance(done, bool) and done >= 0:
                self.predicted[node] = self.predicted.get(node, 0) + done
            return False
        correct, examples = record[MetricKey.CORRECT], record.get(MetricKey.NUM_EXAMPLES)
        for key, value in ((MetricKey.CORRECT, correct), (MetricKey.NUM_EXAMPLES, examples)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ProtocolError(f"evaluation reply: metrics.{key}: expected a count, got {value!r}")
        classes = class_counts(content)
        if node in self.counts and self.counts[node].shape != classes.shape:
            raise ProtocolError(f"evaluation reply: metrics.tp/fp/fn: {classes.shape[1]} classes, "
                                f"earlier replies had {self.counts[node].shape[1]}")
        self.correct[node] = self.correct.get(node, 0) + int(correct)
        self.seen[node] = self.seen.get(node, 0) + int(examples)
        self.counts[node] = classes if node not in self.counts else self.counts[node] + classes
        return True

    def report(self, server_round: int, scope: str, tenant_of: dict[int, str], active: set[int],
               phase: Exchange) -> EvalReport:
        """The evaluation's report over the ``active`` nodes that evaluated something."""
        done = [n for n in active if self.seen.get(n)]
        per_tenant = {tenant_of[n]: self.correct[n] / self.seen[n] for n in done}
        per_tenant_f1 = {tenant_of[n]: macro_f1_from_counts(*self.counts[n]) for n in done}
        weights = {tenant_of[n]: self.seen[n] if scope == "tenant" else 1 for n in done}
        return EvalReport(
            server_round=server_round, scope=scope, accuracy=weighted_mean(per_tenant, weights),
            macro_f1=weighted_mean(per_tenant_f1, weights), per_tenant=per_tenant, per_tenant_f1=per_tenant_f1,
            num_examples={tenant_of[n]: self.seen.get(n, self.predicted.get(n, 0)) for n in active if n in tenant_of},
            dropped=dict(phase.dropped), round_trips=phase.round_trips, flower_wait_seconds=phase.wait,
            wall_seconds=time.perf_counter() - phase.started)


def describe(report: RoundReport | EvalReport) -> str:
    """One log line for a report."""
    if isinstance(report, EvalReport):
        acc = "n/a" if report.accuracy is None else f"{report.accuracy:.4f}"
        f1 = "n/a" if report.macro_f1 is None else f"{report.macro_f1:.4f}"
        tenants = ", ".join(f"{t} {a:.3f}" for t, a in sorted(report.per_tenant.items()))
        return (f"evaluation ({report.scope} test sets) after round {report.server_round}: accuracy {acc}, "
                f"macro-F1 {f1} over {sum(report.num_examples.values())} examples ({tenants})")
    loss = "n/a" if report.train_loss is None else f"{report.train_loss:.4f}"
    return (f"round {report.server_round}: train loss {loss} over {report.num_examples} examples, "
            f"{len(report.tenants)} tenants ({len(report.dropped)} dropped), {report.steps} steps, "
            f"{report.round_trips} round trips ({report.round_trips_per_step:.2f} per step), "
            f"{report.flower_wait_seconds:.1f} s waiting on Flower, {report.cloud_seconds:.1f} s cloud, "
            f"{report.dealer_seconds:.1f} s dealer, {report.wall_seconds:.1f} s total")


__all__ = ["EvalReport", "EvalTally", "Exchange", "RoundReport", "SplitResult", "class_counts",
           "describe", "weighted_mean"]
