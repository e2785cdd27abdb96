"""The base of the split strategies: rounds, node selection, round trips and drop-outs.

A split strategy drives a multi-stage protocol (several round trips per step), so it cannot
be one of Flower's single-round-trip ``Strategy`` subclasses; it keeps their shape instead:
:meth:`SplitStrategyBase.start` runs the rounds, and a security level's strategy overrides
the hooks

- :meth:`train_round` (one training round for the selected tenants),
- :meth:`evaluate` (one evaluation, aggregated with :class:`EvalTally`),
- :meth:`admit_nodes` (new nodes, e.g. the secure set-up), :meth:`forget_step` (what the
  cloud drops with a tenant) and :meth:`summary`,

while :meth:`exchange` (one ``send_and_receive`` for all tenants, errors and time-outs turned
into drop-outs), :meth:`stream` (every tenant at its own pace, each reply answered when it
arrives) and :meth:`drop` stay shared. A tenant dropped from a round is selected again
at the next one.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from logging import INFO, WARNING
from typing import Any, Callable

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flower_split.flower.contract import NOT_A_TENANT_CODE, OUT_OF_RANGE_CODE
from flower_split.flower.stream import converse
from flower_split.flower.strategy_utils import EvalReport, Exchange, RoundReport, SplitResult, describe
from flower_split.protocol import ProtocolError
from flower_split.protocol.opened_range import OutOfRange

Report = RoundReport | EvalReport

# Flower's error codes (flwr.common.constant.ErrorCode) that say what happened to the node
ERROR_CAUSES = {
    3: "message expired before the node took it",  # MESSAGE_UNAVAILABLE
    4: "reply expired",  # REPLY_MESSAGE_UNAVAILABLE
    5: "node gone (the SuperLink stopped receiving its heartbeats)",  # NODE_UNAVAILABLE
    8: "ClientApp crashed",  # CLIENT_APP_CRASHED
}


def drop_reason(message_type: str, error: Any, waited: float, timeout: float | None) -> str:
    """Why a node leaves the round, for the log and the report: what happened, after how long.

    ``error``: the node's error reply (None: no reply at all).
    """
    if error is None:
        if timeout is None or waited >= timeout - 0.5:
            return f"{message_type}: no reply: timed out after {waited:.1f} s (reply-timeout {timeout} s)"
        return (f"{message_type}: no reply after {waited:.1f} s, before the {timeout} s reply timeout "
                "(node gone)")
    cause = ERROR_CAUSES.get(error.code)
    if cause is None:
        return f"{message_type}: error reply: {error.reason}"
    return f"{message_type}: error reply: {cause}, after {waited:.1f} s ({error.reason})"


def stage_message(node: int, content: RecordDict, message_type: str, server_round: int) -> Message:
    """A stage's message to ``node`` (grouped by its round), as :meth:`SplitStrategyBase.exchange`
    and :meth:`SplitStrategyBase.stream` send it."""
    return Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round))


class SplitStrategyBase(ABC):
    """What every split strategy shares.

    Parameters
    ----------
    cloud : Any
        The cloud party (the frozen body and one cloud half per tenant in secure mode).
    local_steps : int
        Steps (micro-batches) each tenant trains per round.
    min_nodes : int (default: 2)
        Tenants that must be connected before a round starts.
    reply_timeout : float | None (default: 600.0)
        Seconds to wait for a stage's replies; later tenants are dropped from the round.
    node_wait_timeout : float (default: 600.0)
        Seconds to wait for ``min_nodes`` tenants to connect.
    global_eval : bool (default: True)
        After the last round, also evaluate every tenant's adapters on the whole test set.
    target_loss : float | None (default: None)
        The stop rule: once a tenant's own reported round loss is <= ``target_loss``, it gets
        no more training work (:meth:`training_nodes`) but is still evaluated; the round it
        stopped is in every later :class:`RoundReport`'s ``stopped``. None: train every round.
    """

    name = "split"

    def __init__(self, cloud: Any, local_steps: int, min_nodes: int = 2, reply_timeout: float | None = 600.0,
                 node_wait_timeout: float = 600.0, global_eval: bool = True, target_loss: float | None = None) -> None:
        if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps <= 0:
            raise ValueError(f"local_steps must be a positive integer, got {local_steps!r}")
        if target_loss is not None and (isinstance(target_loss, bool) or not target_loss > 0):
            raise ValueError(f"target_loss must be a positive number or None, got {target_loss!r}")
        self.cloud = cloud
        self.local_steps = local_steps
        self.min_nodes = min_nodes
        self.reply_timeout = reply_timeout
        self.node_wait_timeout = node_wait_timeout
        self.global_eval = global_eval
        self.tenant_of: dict[int, str] = {}
        self.not_tenants: set[int] = set()  # nodes that answered as secure mode's dealer node (left out)
        self.target_loss = target_loss
        self.stopped: dict[str, int] = {}  # tenant -> the round its loss reached target_loss
        self.label_dp: dict[str, float] = {}  # tenant -> the label-DP epsilon it last reported
        self.trained: set[str] = set()  # tenants that finished a training round (they must hold state)
        self.checkpoint: Callable[[int], None] | None = None  # saves the strategy (flower.cloud_state)
        self.progress: tuple[int, int] = (0, 0)  # (round in progress, its training steps done)
        # opt-in cross-tenant sharing after each training round (flower.sharing_server; None: off)
        self.sharing: Callable[..., Any] | None = None  # (strategy, grid, round, tenants, final=...)

    # -- hooks ---------------------------------------------------------------------------------

    @abstractmethod
    def train_round(self, grid: Grid, server_round: int) -> RoundReport:
        """One training round for every selected tenant."""

    @abstractmethod
    def evaluate(self, grid: Grid, server_round: int, scope: str = "tenant") -> EvalReport:
        """Inference on each tenant's own test split (``scope="global"``: on the whole test set)."""

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "%s: %d steps per tenant and round, min %d tenants, reply timeout %s s", type(self).__name__,
            self.local_steps, self.min_nodes, self.reply_timeout)

    def admit_nodes(self, grid: Grid, nodes: set[int]) -> set[int]:
        """The connected ``nodes`` that may take part (secure mode sets new ones up first)."""
        return nodes

    def forget_step(self, tenant: str, garbage: bool = False) -> None:
        """Free what the cloud holds of ``tenant``'s steps in flight (``garbage``: a party refused
        a value it opened as out of range; secure mode undoes the step before as well)."""
        self.cloud.drop_tenant(tenant)

    # -- saved state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What the strategy must keep to resume: per-tenant bookkeeping and the cloud's state."""
        return {"stopped": dict(self.stopped), "label_dp": dict(self.label_dp), "trained": sorted(self.trained),
                "progress": list(self.progress), "cloud": self.cloud_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (a restarted ServerApp; node ids are learnt again)."""
        self.stopped = {str(k): int(v) for k, v in state["stopped"].items()}
        self.label_dp = {str(k): float(v) for k, v in state["label_dp"].items()}
        self.trained = {str(t) for t in state["trained"]}
        self.progress = (int(state["progress"][0]), int(state["progress"][1]))
        self.load_cloud_state(state["cloud"])

    def cloud_state(self) -> Any:
        """The cloud party's state to save (plain: None, it keeps nothing of a tenant between steps)."""
        return None

    def load_cloud_state(self, state: Any) -> None:
        """Restore :meth:`cloud_state` after a restart."""

    def safe_point(self, completed_round: int, steps_done: int = 0) -> None:
        """No step is in flight: save the strategy (with ``checkpoint``), ``completed_round`` done
        and ``steps_done`` training steps of the next one (a resumed round runs only the rest)."""
        self.progress = (completed_round + 1, steps_done)
        if self.checkpoint is not None:
            self.checkpoint(completed_round)

    def save_now(self) -> None:
        """Save the strategy (with ``checkpoint``) with its progress as it is: a state change
        between safe points that a restart must not lose (a sharing phase's loads)."""
        if self.checkpoint is not None:
            self.checkpoint(self.progress[0] - 1)

    def steps_done(self, server_round: int) -> int:
        """Training steps of ``server_round`` done before a restart (0 unless it is the one resumed)."""
        return self.progress[1] if self.progress[0] == server_round else 0

    def knows(self, node: int) -> bool:
        """Whether ``node``'s tenant has trained before, so that it must still hold its state."""
        return self.tenant_of.get(node) in self.trained

    # -- running -------------------------------------------------------------------------------

    def start(self, grid: Grid, num_rounds: int, eval_every: int = 1, eval_initial: bool = False,
              on_report: Callable[[Report], None] | None = None, first_round: int = 1) -> SplitResult:
        """Train rounds ``first_round`` .. ``num_rounds``; evaluate every ``eval_every`` rounds
        (0: at the end only); save at every safe point (:meth:`safe_point`).

        ``eval_initial`` also evaluates before the first round (reported as round 0).
        ``first_round`` > 1: a resumed run (:mod:`flower_split.flower.cloud_state`).
        """
        self.summary()
        result = SplitResult()

        def emit(report: Report) -> None:
            (result.evaluations if isinstance(report, EvalReport) else result.rounds).append(report)
            log(INFO, "%s", describe(report))
            if on_report:
                on_report(report)

        if eval_initial and first_round == 1:
            emit(self.evaluate(grid, 0))
        for server_round in range(first_round, num_rounds + 1):
            report = self.train_round(grid, server_round)
            self.trained.update(report.tenants)
            last = server_round == num_rounds
            if self.sharing is not None:
                report.sharing = self.sharing(self, grid, server_round, report.tenants, final=last)
            emit(report)
            scopes = ["tenant"] if last or (eval_every and server_round % eval_every == 0) else []
            for scope in scopes + (["global"] if last and self.global_eval else []):
                emit(self.evaluate(grid, server_round, scope))
            self.safe_point(server_round)
        return result

    def predict(self, grid: Grid, completed_round: int,
                on_report: Callable[[Report], None] | None = None) -> SplitResult:
        """No training: one evaluation of scope ``predict`` (every tenant's own texts,
        :mod:`flower_split.flower.node_predict`), then a save (secure steps used numbers)."""
        report = self.evaluate(grid, completed_round, "predict")
        log(INFO, "predictions after round %d: %s texts (%s)", completed_round, sum(report.num_examples.values()),
            ", ".join(f"{t} {n}" for t, n in sorted(report.num_examples.items())) or "no tenant")
        if on_report:
            on_report(report)
        self.safe_point(completed_round)
        return SplitResult(evaluations=[report])

    def training_nodes(self, nodes: set[int]) -> set[int]:
        """``nodes`` less those whose tenant has met the stop rule (they are still evaluated)."""
        return {node for node in nodes if self.tenant_of.get(node) not in self.stopped}

    def note_round_losses(self, server_round: int, losses: dict[str, float]) -> None:
        """Apply the stop rule to each tenant's own mean loss of ``server_round``."""
        if self.target_loss is None:
            return
        for tenant, loss in losses.items():
            if loss <= self.target_loss and tenant not in self.stopped:
                self.stopped[tenant] = server_round
                log(INFO, "%s reached target-loss %.4g (round loss %.4g): no more training", tenant,
                    self.target_loss, loss)

    def tenant_stopped(self, node: int, stopped_in: float, server_round: int, active: set[int]) -> None:
        """A tenant says its own loss reached its own target in round ``stopped_in``
        (:mod:`~flower_split.flower.stop_rule`): no more training, still evaluated."""
        if not 0 < stopped_in < server_round or stopped_in != int(stopped_in):
            raise ProtocolError(f"metrics.stopped: expected an earlier round, got {stopped_in!r}")
        tenant = self.tenant_of[node]
        self.stopped.setdefault(tenant, int(stopped_in))
        active.discard(node)
        log(INFO, "%s reached its target-loss in round %d: no more training", tenant, int(stopped_in))

    def select(self, grid: Grid) -> set[int]:
        """The connected nodes that may take part, once at least ``min_nodes`` are connected."""
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            nodes = set(grid.get_node_ids()) - self.not_tenants
            if len(nodes) >= self.min_nodes:
                return self.admit_nodes(grid, nodes)
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of the {self.min_nodes} required tenants connected")
            time.sleep(1.0)

    def exchange(self, grid: Grid, message_type: str, contents: dict[int, RecordDict],
                 server_round: int, phase: Exchange, active: set[int],
                 riders: dict[int, Message] | None = None, timeout: float | None = None) -> dict[int, RecordDict]:
        """One round trip to every node in ``contents``; the valid replies by node.

        Nodes that reply with an error or not at all are dropped from ``active``. ``riders``:
        other messages (e.g. to secure mode's dealer node) sent in the same round trip; their
        replies replace them in the dict (a rider without a reply is removed).
        """
        riders = {} if riders is None else riders
        if not contents and not riders:
            return {}
        messages = [stage_message(node, content, message_type, server_round) for node, content in contents.items()]
        messages += list(riders.values())
        started = time.perf_counter()
        timeout = self.reply_timeout if timeout is None else timeout  # shorter for admission queries
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        waited = time.perf_counter() - started
        phase.wait += waited
        phase.round_trips += 1
        valid: dict[int, RecordDict] = {}
        carried = set(riders)
        riders.clear()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in carried and node not in contents:
                riders[node] = reply
                continue
            if node not in contents:
                continue
            if reply.has_error() and reply.error.code == NOT_A_TENANT_CODE:
                log(INFO, "node %d is secure mode's dealer node, no tenant: left out of this run", node)
                self.not_tenants.add(node)
                active.discard(node)
                continue
            if reply.has_error():
                self.drop(node, drop_reason(message_type, reply.error, waited, timeout), phase, active,
                          cause=reply.error)
            else:
                valid[node] = reply.content
        for node in contents:
            if node not in valid and node in active and node not in self.not_tenants:
                self.drop(node, drop_reason(message_type, None, waited, timeout), phase, active)
        return valid

    def stream(self, grid: Grid, message_type: str, contents: dict[int, RecordDict], server_round: int,
               phase: Exchange, active: set[int], answer: Callable[[int, RecordDict], RecordDict | None],
               riders: dict[int, Message] | None = None) -> dict[int, Message]:
        """Converse with every node in ``contents`` at its own pace (:func:`~flower_split.flower.stream.converse`):
        each reply is answered as soon as it arrives by ``answer(node, content)``, the node's next
        content (None: its part is over; a refusal is ``answer``'s to drop). Errors and replies
        later than ``reply_timeout`` drop the node, as in :meth:`exchange`. ``riders``: messages to
        other nodes (e.g. secure mode's dealer node) sent with the first ones; their replies are
        returned by node. The phase counts the longest conversation as its round trips (what
        lockstep would take) and, as waiting, the time not spent in ``answer``.
        """
        riders = {} if riders is None else riders
        started, answering = time.perf_counter(), [0.0]
        rider_replies: dict[int, Message] = {}

        def on_reply(node: int, reply: Message) -> Message | None:
            if node in riders:
                rider_replies[node] = reply
                return None
            if node not in active:  # dropped meanwhile
                return None
            tick = time.perf_counter()
            try:
                following = answer(node, reply.content)
            finally:
                answering[0] += time.perf_counter() - tick
            if following is None or node not in active:
                return None
            return stage_message(node, following, message_type, server_round)

        def on_fail(node: int, error: Any, waited: float) -> None:
            if node not in riders and node in active:
                self.drop(node, drop_reason(message_type, error, waited, self.reply_timeout), phase, active,
                          cause=error)

        opening = [stage_message(n, c, message_type, server_round) for n, c in contents.items()]
        sent = converse(grid, opening + list(riders.values()), on_reply, on_fail, self.reply_timeout)
        phase.round_trips += max((sent[node] for node in contents), default=0)
        phase.wait += time.perf_counter() - started - answering[0]
        return rider_replies

    def lockstep(self, grid: Grid, message_type: str, contents: dict[int, RecordDict], server_round: int,
                 phase: Exchange, active: set[int], answer: Callable[[int, RecordDict], RecordDict | None],
                 riders: dict[int, Message] | None = None) -> dict[int, Message]:
        """:meth:`stream`'s contract, in lockstep: one :meth:`exchange` for every node with a
        message, all replies answered, then the next exchange. ``riders`` go with the first."""
        riders = dict(riders or {})
        rider_replies: dict[int, Message] = {}
        while contents:
            replies = self.exchange(grid, message_type, contents, server_round, phase, active, riders)
            rider_replies.update(riders)
            riders = {}
            contents = {}
            for node, content in replies.items():
                following = answer(node, content)
                if following is not None and node in active:
                    contents[node] = following
        return rider_replies

    def drop(self, node: int, reason: str, phase: Exchange, active: set[int], cause: object = None) -> None:
        """Drop ``node`` from this round and free its in-flight steps on the cloud; ``cause`` (the
        exception or the node's error reply) decides :meth:`forget_step`'s ``garbage``."""
        tenant = self.tenant_of.get(node)
        active.discard(node)
        if tenant is not None:
            self.forget_step(tenant, opened_out_of_range(cause))
        label = tenant or f"node-{node}"
        phase.dropped[label] = reason
        log(WARNING, "dropping %s from this round: %s", label, reason)


def opened_out_of_range(cause: object) -> bool:
    """Whether a drop's ``cause`` is a value opened out of range: this process's :class:`OutOfRange`,
    or a tenant's error reply with :data:`OUT_OF_RANGE_CODE`."""
    return isinstance(cause, OutOfRange) or getattr(cause, "code", None) == OUT_OF_RANGE_CODE
