"""Flower strategy of split learning: drives the head/body/tail protocol for many tenants.

Each training step of a round is three stages, and each stage is ONE
``grid.send_and_receive`` for all selected tenants at once, each Flower message carrying
``micro_batches`` protocol messages of that tenant (a "pack", see
:mod:`flower_split.flower.records`)::

    train.head_fwd  -> tenants: next micro-batches through the head; reply HeadOutputs
    (cloud)            CloudParty: body forward on all tenants' micro-batches, stacked
    train.tail      -> tenants: tail forward, loss, tail update; reply BodyGrads (+ loss, plain)
    (cloud)            CloudParty: body backward, one per stacked group
    train.head_bwd  -> tenants: head update (skipped when the head is frozen)

so a round of ``local_steps`` micro-batches per tenant costs ``3 * ceil(local_steps /
micro_batches)`` round trips, whatever the number of tenants. Evaluation is
``evaluate.infer_fwd`` / ``evaluate.infer_tail`` until every tenant's test set is done. The
cloud stacks every valid tenant's micro-batches of a stage (:meth:`CloudParty.handle_many`,
groups of at most ``max_stack_rows`` rows), so the body runs once per stage and group, not
once per (tenant, micro-batch).

A tenant that does not reply in time, replies with an error or sends a malformed pack is
dropped for the rest of the round (its in-flight steps are forgotten by the cloud,
:meth:`CloudParty.drop_tenant`); the others continue, and it is selected again next round.
The strategy holds no tenant data: it sees head outputs and body-output gradients only (and,
in plain mode, each tenant's self-reported loss and accuracy counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.common import log

from flower_split.protocol import BodyGrad, BodyOutput, CloudParty, HeadGrad, HeadOutput, ProtocolError
from flower_split.train.metrics import macro_f1_from_counts
from flower_split.flower.records import pack_messages, pack_tenant, read_metrics, unpack_messages

HEAD_FWD = "train.head_fwd"
TAIL = "train.tail"
HEAD_BWD = "train.head_bwd"
INFER_FWD = "evaluate.infer_fwd"
INFER_TAIL = "evaluate.infer_tail"


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
class _Exchange:
    """Counters of one phase (round or evaluation)."""

    round_trips: int = 0
    wait: float = 0.0
    cloud: float = 0.0
    dealer: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)


class SplitStrategy:
    """Split learning (security ``plain``) over the Flower Message API.

    Parameters
    ----------
    cloud : CloudParty
        The cloud's state machine with the frozen body; shared by every tenant.
    local_steps : int
        Micro-batches each tenant trains per round.
    micro_batches : int (default: 8)
        Micro-batches carried per Flower message (amortizes the round-trip latency; the head
        gradients of a pack are applied ``micro_batches - 1`` steps late at most).
    eval_micro_batches : int | None (default: None, same as ``micro_batches``)
        Test batches per Flower message during evaluation.
    min_nodes : int (default: 2)
        Tenants that must be connected before a round starts.
    reply_timeout : float | None (default: 600.0)
        Seconds to wait for a stage's replies; later tenants are dropped from the round.
    node_wait_timeout : float (default: 600.0)
        Seconds to wait for ``min_nodes`` tenants to connect.
    global_eval : bool (default: True)
        After the last round, also evaluate every tenant's adapters on the whole test set.
    """

    def __init__(self, cloud: CloudParty, local_steps: int, micro_batches: int = 8,
                 eval_micro_batches: int | None = None, min_nodes: int = 2,
                 reply_timeout: float | None = 600.0, node_wait_timeout: float = 600.0,
                 global_eval: bool = True) -> None:
        if local_steps <= 0 or micro_batches <= 0:
            raise ValueError("local_steps and micro_batches must be positive")
        self.cloud = cloud
        self.local_steps = local_steps
        self.micro_batches = micro_batches
        self.eval_micro_batches = eval_micro_batches or micro_batches
        self.min_nodes = min_nodes
        self.reply_timeout = reply_timeout
        self.node_wait_timeout = node_wait_timeout
        self.global_eval = global_eval
        self._tenant_of: dict[int, str] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "SplitStrategy (plain): %d micro-batches per tenant and round, %d per message, "
                  "min %d tenants, reply timeout %s s", self.local_steps, self.micro_batches,
            self.min_nodes, self.reply_timeout)

    # -- running -------------------------------------------------------------------------------

    def start(self, grid: Grid, num_rounds: int, eval_every: int = 1, eval_initial: bool = False,
              on_report: Callable[[RoundReport | EvalReport], None] | None = None) -> SplitResult:
        """Train ``num_rounds`` rounds; evaluate every ``eval_every`` rounds (0: at the end only).

        ``eval_initial`` also evaluates before the first round (reported as round 0).
        """
        self.summary()
        result = SplitResult()
        if eval_initial:
            evaluation = self.evaluate(grid, 0)
            result.evaluations.append(evaluation)
            if on_report:
                on_report(evaluation)
        for server_round in range(1, num_rounds + 1):
            report = self.train_round(grid, server_round)
            result.rounds.append(report)
            if on_report:
                on_report(report)
            last = server_round == num_rounds
            scopes = ["tenant"] if last or (eval_every and server_round % eval_every == 0) else []
            for scope in scopes + (["global"] if last and self.global_eval else []):
                evaluation = self.evaluate(grid, server_round, scope)
                result.evaluations.append(evaluation)
                if on_report:
                    on_report(evaluation)
        return result

    def train_round(self, grid: Grid, server_round: int) -> RoundReport:
        """One round: ``local_steps`` micro-batches for every selected tenant."""
        started = time.perf_counter()
        phase = _Exchange()
        active = self._select(grid)
        loss_sum, examples, done = 0.0, 0, 0
        while done < self.local_steps and active:
            count = min(self.micro_batches, self.local_steps - done)
            config = ConfigRecord({"num-batches": count, "server-round": server_round})
            replies = self._exchange(grid, HEAD_FWD, {n: RecordDict({"config": config}) for n in active},
                                     server_round, phase, active)
            outputs = self._cloud_stage(replies, HeadOutput, phase, active)
            forward = {node: pack_messages(BodyOutput, self._tenant_of[node], messages)
                       for node, messages in outputs.items()}
            replies = self._exchange(grid, TAIL, forward, server_round, phase, active)
            metrics: dict[int, dict[str, float]] = {}
            for node, content in replies.items():
                try:
                    metrics[node] = read_metrics(content, ("train-loss", "num-examples"))
                except ProtocolError as exc:
                    self._drop(node, str(exc), phase, active)
            grads = self._cloud_stage({n: replies[n] for n in metrics}, BodyGrad, phase, active)
            backward: dict[int, RecordDict] = {}
            for node, messages in grads.items():
                loss_sum += metrics[node]["train-loss"] * metrics[node]["num-examples"]
                examples += int(metrics[node]["num-examples"])
                if messages:
                    backward[node] = pack_messages(HeadGrad, self._tenant_of[node], messages)
            if backward:
                self._exchange(grid, HEAD_BWD, backward, server_round, phase, active)
            done += count
        report = RoundReport(
            server_round=server_round,
            tenants=sorted(self._tenant_of[n] for n in active),
            dropped=dict(phase.dropped),
            train_loss=loss_sum / examples if examples else None,
            num_examples=examples,
            steps=done,
            round_trips=phase.round_trips,
            flower_wait_seconds=phase.wait,
            cloud_seconds=phase.cloud,
            wall_seconds=time.perf_counter() - started,
        )
        log(INFO, "round %d: train loss %s over %d examples, %d tenants (%d dropped), "
                  "%d round trips (%.2f per step), %.1f s waiting on Flower, %.1f s cloud, %.1f s total",
            server_round, "n/a" if report.train_loss is None else f"{report.train_loss:.4f}",
            examples, len(report.tenants), len(report.dropped), report.round_trips,
            report.round_trips_per_step, report.flower_wait_seconds, report.cloud_seconds,
            report.wall_seconds)
        return report

    def evaluate(self, grid: Grid, server_round: int, scope: str = "tenant") -> EvalReport:
        """Inference (head -> cloud body -> tail) on each tenant's own test split or, with
        ``scope="global"``, on the whole test set."""
        started = time.perf_counter()
        phase = _Exchange()
        active = self._select(grid)
        pending = set(active)
        restart = {node: True for node in active}
        correct: dict[int, int] = {node: 0 for node in active}
        seen: dict[int, int] = {node: 0 for node in active}
        counts: dict[int, np.ndarray] = {}
        while pending:
            instructions = {
                node: RecordDict({"config": ConfigRecord({"num-batches": self.eval_micro_batches,
                                                          "restart": restart[node], "scope": scope,
                                                          "server-round": server_round})})
                for node in pending
            }
            replies = self._exchange(grid, INFER_FWD, instructions, server_round, phase, active)
            pending &= set(active)
            remaining: dict[int, float] = {}
            for node, content in replies.items():
                restart[node] = False
                try:
                    remaining[node] = read_metrics(content, ("remaining",))["remaining"]
                except ProtocolError as exc:
                    self._drop(node, str(exc), phase, active)
            outputs = self._cloud_stage({n: replies[n] for n in remaining}, HeadOutput, phase, active,
                                        inference=True)
            forward: dict[int, RecordDict] = {}
            for node, messages in outputs.items():
                if not messages and remaining[node] > 0:  # would loop forever
                    self._drop(node, f"{INFER_FWD}: no test batches sent but {remaining[node]:.0f} remaining",
                               phase, active)
                    continue
                if messages:
                    forward[node] = pack_messages(BodyOutput, self._tenant_of[node], messages)
                if remaining[node] == 0:
                    pending.discard(node)
            replies = self._exchange(grid, INFER_TAIL, forward, server_round, phase, active)
            for node, content in replies.items():
                try:
                    metrics = read_metrics(content, ("correct", "num-examples"), lists=("tp", "fp", "fn"))
                    classes = _class_counts(content)
                    if node in counts and counts[node].shape != classes.shape:
                        raise ProtocolError(f"{INFER_TAIL} reply: metrics.tp/fp/fn: {classes.shape[1]} classes, "
                                            f"earlier replies had {counts[node].shape[1]}")
                except ProtocolError as exc:
                    self._drop(node, str(exc), phase, active)
                    continue
                correct[node] += int(metrics["correct"])
                seen[node] += int(metrics["num-examples"])
                counts[node] = classes if node not in counts else counts[node] + classes
            pending &= set(active)
        done = [n for n in active if seen[n]]
        per_tenant = {self._tenant_of[n]: correct[n] / seen[n] for n in done}
        per_tenant_f1 = {self._tenant_of[n]: macro_f1_from_counts(*counts[n]) for n in done}
        weights = {self._tenant_of[n]: seen[n] if scope == "tenant" else 1 for n in done}
        report = EvalReport(
            server_round=server_round,
            scope=scope,
            accuracy=_weighted(per_tenant, weights),
            macro_f1=_weighted(per_tenant_f1, weights),
            per_tenant=per_tenant,
            per_tenant_f1=per_tenant_f1,
            num_examples={self._tenant_of[n]: seen[n] for n in active},
            dropped=dict(phase.dropped),
            round_trips=phase.round_trips,
            flower_wait_seconds=phase.wait,
            wall_seconds=time.perf_counter() - started,
        )
        log(INFO, "evaluation (%s test sets) after round %d: accuracy %s, macro-F1 %s over %d examples (%s)",
            scope, server_round, "n/a" if report.accuracy is None else f"{report.accuracy:.4f}",
            "n/a" if report.macro_f1 is None else f"{report.macro_f1:.4f}", sum(seen.values()),
            ", ".join(f"{t} {a:.3f}" for t, a in sorted(per_tenant.items())))
        return report

    # -- plumbing ------------------------------------------------------------------------------

    def _select(self, grid: Grid) -> set[int]:
        """All connected nodes, once at least ``min_nodes`` are."""
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            nodes = set(grid.get_node_ids())
            if len(nodes) >= self.min_nodes:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of the {self.min_nodes} required tenants connected")
            time.sleep(1.0)

    def _exchange(self, grid: Grid, message_type: str, contents: dict[int, RecordDict],
                  server_round: int, phase: _Exchange, active: set[int]) -> dict[int, RecordDict]:
        """One round trip to every node in ``contents``; return the valid replies by node.

        Nodes that reply with an error or not at all are dropped from ``active``.
        """
        if not contents:
            return {}
        messages: Iterable[Message] = [
            Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round))
            for node, content in contents.items()
        ]
        started = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=self.reply_timeout))
        phase.wait += time.perf_counter() - started
        phase.round_trips += 1
        valid: dict[int, RecordDict] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in contents:
                continue
            if reply.has_error():
                self._drop(node, f"{message_type}: error reply: {reply.error.reason}", phase, active)
            else:
                valid[node] = reply.content
        for node in contents:
            if node not in valid and node in active:
                self._drop(node, f"{message_type}: no reply within {self.reply_timeout} s", phase, active)
        return valid

    def _cloud_stage(self, contents: dict[int, RecordDict], kind: type, phase: _Exchange,
                     active: set[int], inference: bool = False) -> dict[int, list]:
        """Run the cloud once on every node's pack of ``kind``; the replies by node.

        Each node's pack is checked on its own first and a node with a bad one is dropped, so
        :meth:`CloudParty.handle_many` (which rejects a call as a whole) gets valid packs only
        and stacks all tenants' micro-batches of the stage into one body forward / backward.
        """
        started = time.perf_counter()
        try:
            accepted: dict[int, list] = {}
            admitted: list = []
            for node, content in contents.items():
                try:
                    accepted[node] = self._admit(node, content, kind, inference, active, admitted)
                except ProtocolError as exc:
                    self._drop(node, str(exc), phase, active)
                    continue
                admitted += accepted[node]
            replies = iter(self.cloud.handle_many(admitted))
            return {node: [next(replies) for _ in messages] for node, messages in accepted.items()}
        finally:
            phase.cloud += time.perf_counter() - started

    def _admit(self, node: int, content: RecordDict, kind: type, inference: bool, active: set[int],
               admitted: list) -> list:
        """Unpack and check a node's pack against the cloud's state and the packs ``admitted``
        to the same call (``inference``: no training step allowed); raise
        :class:`ProtocolError` if the node must be dropped."""
        tenant = pack_tenant(content)
        known = self._tenant_of.get(node)
        if known is not None and known != tenant:
            raise ProtocolError(f"node {node} was tenant {known!r}, now claims {tenant!r}")
        owner = next((n for n, t in self._tenant_of.items() if t == tenant and n != node), None)
        if owner is not None and owner in active:
            raise ProtocolError(f"tenant {tenant!r} is already served by node {owner}")
        self._tenant_of[node] = tenant
        incoming = unpack_messages(content, kind, tenant)
        if inference:
            for message in incoming:
                if message.train:
                    raise ProtocolError(f"step {message.step}: a training step during evaluation")
        self.cloud.check(incoming, admitted)
        return incoming

    def _drop(self, node: int, reason: str, phase: _Exchange, active: set[int]) -> None:
        """Drop ``node`` from this round and free its in-flight steps on the cloud."""
        tenant = self._tenant_of.get(node)
        active.discard(node)
        if tenant is not None:
            self._forget_step(tenant)
        label = tenant or f"node-{node}"
        phase.dropped[label] = reason
        log(WARNING, "dropping %s from this round: %s", label, reason)

    def _forget_step(self, tenant: str) -> None:
        """Free what the cloud holds of ``tenant``'s steps in flight."""
        self.cloud.drop_tenant(tenant)


def _class_counts(content: RecordDict) -> np.ndarray:
    """The per-class [tp, fp, fn] counts of an ``evaluate.infer_tail`` reply, as a [3, C] array."""
    record = content.get("metrics")
    try:
        rows = [list(record[key]) for key in ("tp", "fp", "fn")]
        counts = np.asarray(rows, dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{INFER_TAIL} reply: metrics.tp/fp/fn: missing or not equal-length integer lists "
                            f"({exc})") from None
    if counts.ndim != 2 or (counts < 0).any():
        raise ProtocolError(f"{INFER_TAIL} reply: metrics.tp/fp/fn: expected non-negative counts")
    return counts


def _weighted(values: dict[str, float], weights: dict[str, int]) -> float | None:
    total = sum(weights[t] for t in values)
    return sum(v * weights[t] for t, v in values.items()) / total if total else None
