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
in plain mode, each tenant's self-reported loss and accuracy counts, unless the run keeps
them on the tenants: ``secure-metrics`` false, as a tenant's node config ``private`` demands).
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flower_split.flower.contract import ConfigKey, MessageType, MetricKey, RecordKey
from flower_split.flower.records import pack_messages, pack_tenant, read_metrics, unpack_messages
from flower_split.flower.strategy import SplitStrategyBase
from flower_split.flower.strategy_utils import EvalReport, EvalTally, Exchange, RoundReport
from flower_split.protocol import BodyGrad, BodyOutput, CloudParty, HeadGrad, HeadOutput, ProtocolError


class SplitStrategy(SplitStrategyBase):
    """Split learning (security ``plain``) over the Flower Message API.

    Parameters as for :class:`~flower_split.flower.strategy.SplitStrategyBase`, plus
    ``micro_batches`` (default 8): micro-batches carried per Flower message (amortizes the
    round-trip latency; the head gradients of a pack are applied ``micro_batches - 1`` steps
    late at most), ``eval_micro_batches`` (default: ``micro_batches``): test batches per
    Flower message during evaluation, and ``tenant_metrics`` (default True): tenants report
    their evaluation counts, and a reply without them is dropped; False (run config
    ``secure-metrics`` false): they keep them and their losses, and evaluation reports no accuracy.
    """

    def __init__(self, cloud: CloudParty, local_steps: int, micro_batches: int = 8,
                 eval_micro_batches: int | None = None, min_nodes: int = 2,
                 reply_timeout: float | None = 600.0, node_wait_timeout: float = 600.0,
                 global_eval: bool = True, target_loss: float | None = None, tenant_metrics: bool = True) -> None:
        super().__init__(cloud, local_steps, min_nodes, reply_timeout, node_wait_timeout, global_eval, target_loss)
        if target_loss is not None and not tenant_metrics:
            raise ValueError("target_loss needs the tenants' reported losses, and tenant_metrics=False keeps them")
        self.tenant_metrics = tenant_metrics
        if not isinstance(micro_batches, int) or micro_batches <= 0:
            raise ValueError(f"micro_batches must be a positive integer, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self.eval_micro_batches = eval_micro_batches or micro_batches

    def summary(self) -> None:
        log(INFO, "SplitStrategy (plain): %d micro-batches per tenant and round, %d per message, "
                  "min %d tenants, reply timeout %s s", self.local_steps, self.micro_batches,
            self.min_nodes, self.reply_timeout)

    def train_round(self, grid: Grid, server_round: int) -> RoundReport:
        """One round: ``local_steps`` micro-batches for every selected tenant, three stages each
        (tenants that met the stop rule are not selected)."""
        phase = Exchange()
        active = self.training_nodes(self.select(grid))
        losses: dict[int, tuple[float, int]] = {}  # node -> (loss sum, examples) of this round
        done, examples = self.steps_done(server_round), 0  # a round interrupted by a restart runs only the rest
        while done < self.local_steps and active:
            count = min(self.micro_batches, self.local_steps - done)
            replies = self.exchange(grid, MessageType.HEAD_FWD, {n: RecordDict({RecordKey.CONFIG: ConfigRecord({
                ConfigKey.NUM_BATCHES: count, ConfigKey.SERVER_ROUND: server_round,
                ConfigKey.KNOWN: self.knows(n)})}) for n in active}, server_round, phase, active)
            replies = self._unless_stopped(replies, server_round, phase, active)
            outputs = self.cloud_stage(replies, HeadOutput, phase, active)
            forward = {node: pack_messages(BodyOutput, self.tenant_of[node], messages)
                       for node, messages in outputs.items()}
            replies = self.exchange(grid, MessageType.TAIL, forward, server_round, phase, active)
            metrics: dict[int, dict[str, float]] = {}
            for node, content in replies.items():
                try:
                    metrics[node] = read_metrics(content, (MetricKey.NUM_EXAMPLES,))  # loss: not under label-DP
                except ProtocolError as exc:
                    self.drop(node, str(exc), phase, active)
            grads = self.cloud_stage({n: replies[n] for n in metrics}, BodyGrad, phase, active)
            backward: dict[int, RecordDict] = {}
            for node, messages in grads.items():
                examples += int(metrics[node][MetricKey.NUM_EXAMPLES])
                if MetricKey.LABEL_DP_EPSILON in metrics[node]:
                    self.label_dp[self.tenant_of[node]] = float(metrics[node][MetricKey.LABEL_DP_EPSILON])
                if MetricKey.TRAIN_LOSS in metrics[node]:
                    n_examples = int(metrics[node][MetricKey.NUM_EXAMPLES])
                    total, seen = losses.get(node, (0.0, 0))
                    losses[node] = (total + metrics[node][MetricKey.TRAIN_LOSS] * n_examples, seen + n_examples)
                if messages:
                    backward[node] = pack_messages(HeadGrad, self.tenant_of[node], messages)
            self.exchange(grid, MessageType.HEAD_BWD, backward, server_round, phase, active)
            done += count
            self.safe_point(server_round - 1, done)  # no step in flight
        loss_sum, reported = sum(v[0] for v in losses.values()), sum(v[1] for v in losses.values())
        self.note_round_losses(server_round, {self.tenant_of[n]: losses[n][0] / losses[n][1]
                                              for n in active if losses.get(n, (0, 0))[1]})
        return RoundReport(
            server_round=server_round, tenants=sorted(self.tenant_of[n] for n in active),
            dropped=dict(phase.dropped), train_loss=loss_sum / reported if reported == examples and examples else None,
            num_examples=examples, steps=done, round_trips=phase.round_trips,
            flower_wait_seconds=phase.wait, cloud_seconds=phase.cloud,
            wall_seconds=time.perf_counter() - phase.started, stopped=dict(self.stopped),
            label_dp_epsilon=dict(self.label_dp))

    def _unless_stopped(self, replies: dict[int, RecordDict], server_round: int, phase: Exchange,
                        active: set[int]) -> dict[int, RecordDict]:
        """The ``train.head_fwd`` replies less those of tenants whose own stop rule fired
        (``metrics`` {stopped}, :mod:`~flower_split.flower.stop_rule`): they train no more."""
        going: dict[int, RecordDict] = {}
        for node, content in replies.items():
            record = content.get(RecordKey.METRICS)
            if isinstance(record, MetricRecord) and MetricKey.STOPPED in record:
                try:
                    self.tenant_stopped(node, read_metrics(content)[MetricKey.STOPPED], server_round, active)
                except ProtocolError as exc:
                    self.drop(node, f"{MessageType.HEAD_FWD}: {exc}", phase, active)
            else:
                going[node] = content
        return going

    def evaluate(self, grid: Grid, server_round: int, scope: str = "tenant") -> EvalReport:
        """Inference (head -> cloud body -> tail) on each tenant's own test split or, with
        ``scope="global"``, on the whole test set."""
        phase, tally = Exchange(), EvalTally()
        active = self.select(grid)
        pending, restart = set(active), {node: True for node in active}
        while pending:
            instructions = {node: RecordDict({RecordKey.CONFIG: ConfigRecord({
                ConfigKey.NUM_BATCHES: self.eval_micro_batches, ConfigKey.RESTART: restart[node],
                ConfigKey.SCOPE: scope, ConfigKey.SERVER_ROUND: server_round,
                ConfigKey.KNOWN: self.knows(node)})}) for node in pending}
            replies = self.exchange(grid, MessageType.INFER_FWD, instructions, server_round, phase, active)
            pending &= active
            forward = self._forward_test_batches(replies, restart, pending, phase, active)
            replies = self.exchange(grid, MessageType.INFER_TAIL, forward, server_round, phase, active)
            for node, content in replies.items():
                try:
                    if not tally.add(node, content) and scope != "predict" and self.tenant_metrics:
                        raise ProtocolError(f"{MessageType.INFER_TAIL} reply: no evaluation counts")
                except ProtocolError as exc:
                    self.drop(node, str(exc), phase, active)
            pending &= active
        return tally.report(server_round, scope, self.tenant_of, active, phase)

    def _forward_test_batches(self, replies: dict[int, RecordDict], restart: dict[int, bool], pending: set[int],
                              phase: Exchange, active: set[int]) -> dict[int, RecordDict]:
        """Body forward on every tenant's test batches; tenants with none left leave ``pending``."""
        remaining: dict[int, float] = {}
        for node, content in replies.items():
            restart[node] = False
            try:
                remaining[node] = read_metrics(content, (MetricKey.REMAINING,))[MetricKey.REMAINING]
            except ProtocolError as exc:
                self.drop(node, str(exc), phase, active)
        outputs = self.cloud_stage({n: replies[n] for n in remaining}, HeadOutput, phase, active, inference=True)
        forward: dict[int, RecordDict] = {}
        for node, messages in outputs.items():
            if not messages and remaining[node] > 0:  # would loop forever
                self.drop(node, f"{MessageType.INFER_FWD}: no test batches sent but {remaining[node]:.0f} "
                                "remaining", phase, active)
                continue
            if messages:
                forward[node] = pack_messages(BodyOutput, self.tenant_of[node], messages)
            if remaining[node] == 0:
                pending.discard(node)
        return forward

    # -- the cloud's stages --------------------------------------------------------------------

    def cloud_stage(self, contents: dict[int, RecordDict], kind: type, phase: Exchange,
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
                    self.drop(node, str(exc), phase, active)
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
        known = self.tenant_of.get(node)
        if known is not None and known != tenant:
            raise ProtocolError(f"node {node} was tenant {known!r}, now claims {tenant!r}")
        owner = next((n for n, t in self.tenant_of.items() if t == tenant and n != node), None)
        if owner is not None and owner in active:
            raise ProtocolError(f"tenant {tenant!r} is already served by node {owner}")
        self.tenant_of[node] = tenant
        incoming = unpack_messages(content, kind, tenant)
        if inference:
            for message in incoming:
                if message.train:
                    raise ProtocolError(f"step {message.step}: a training step during evaluation")
        self.cloud.check(incoming, admitted)
        return incoming
