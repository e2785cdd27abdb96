"""Unit tests of the split strategies' shared parts: scheduling, round trips, drop-outs, aggregation."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from flower_helpers import StubGrid
from flower_split.flower.contract import MessageType, MetricKey, RecordKey, split_type
from flower_split.flower.strategy import SplitStrategyBase, drop_reason
from flower_split.flower.strategy_utils import EvalReport, EvalTally, Exchange, RoundReport, class_counts, weighted_mean
from flower_split.protocol import ProtocolError


class ScriptedGrid(StubGrid):
    """A Grid whose nodes answer by script: ``"ok"`` echoes the content, ``"error"`` / ``"silent"``."""

    def __init__(self, script: dict[int, str]) -> None:
        self.script = script
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.script)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append((node, message.metadata.message_type))
            action = self.script[node]
            if action == "ok":
                reply = Message(message.content, reply_to=message)
            elif action == "error":
                reply = Message(Error(code=2, reason="boom"), reply_to=message)
            else:
                continue
            replies.append(reply)
        return replies


class Forgetful:
    """A cloud that records which tenants' steps it was told to forget."""

    def __init__(self) -> None:
        self.dropped: list[str] = []

    def drop_tenant(self, tenant: str) -> None:
        self.dropped.append(tenant)


class Canned(SplitStrategyBase):
    """Reports without any round trip: exercises the base's schedule only."""

    def train_round(self, grid: Grid, server_round: int) -> RoundReport:
        return RoundReport(server_round, [], {}, 1.0, 0, self.local_steps, 0, 0.0, 0.0, 0.0)

    def evaluate(self, grid: Grid, server_round: int, scope: str = "tenant") -> EvalReport:
        return EvalReport(server_round, scope, None, None, {}, {}, {}, {}, 0, 0.0, 0.0)


def test_start_evaluates_on_schedule_and_globally_after_the_last_round() -> None:
    seen: list = []
    Canned(Forgetful(), 2, min_nodes=1).start(ScriptedGrid({1: "ok"}), 3, eval_every=2, eval_initial=True,
                                              on_report=seen.append)
    kinds = [(type(r).__name__, r.server_round, getattr(r, "scope", "")) for r in seen]
    assert kinds == [("EvalReport", 0, "tenant"), ("RoundReport", 1, ""), ("RoundReport", 2, ""),
                     ("EvalReport", 2, "tenant"), ("RoundReport", 3, ""), ("EvalReport", 3, "tenant"),
                     ("EvalReport", 3, "global")]


def test_exchange_keeps_valid_replies_and_drops_error_and_silent_nodes(task_identity: None) -> None:
    grid = ScriptedGrid({1: "ok", 2: "error", 3: "silent"})
    strategy = Canned(Forgetful(), 1, min_nodes=3, reply_timeout=1.0)
    strategy.tenant_of = {1: "tenant-a", 2: "tenant-b", 3: "tenant-c"}
    phase, active = Exchange(), {1, 2, 3}
    content = {n: RecordDict({RecordKey.CONFIG: ConfigRecord({"n": n})}) for n in active}
    valid = strategy.exchange(grid, MessageType.HEAD_FWD, content, 1, phase, active)
    assert set(valid) == {1} and valid[1][RecordKey.CONFIG]["n"] == 1
    assert active == {1} and phase.round_trips == 1
    assert "error reply: boom" in phase.dropped["tenant-b"] and "no reply" in phase.dropped["tenant-c"]
    assert sorted(strategy.cloud.dropped) == ["tenant-b", "tenant-c"]  # their in-flight steps are freed
    assert strategy.exchange(grid, MessageType.HEAD_FWD, {}, 1, phase, active) == {} and phase.round_trips == 1


def test_drop_reasons_say_what_happened_and_after_how_long() -> None:
    gone = Error(code=5, reason="Error: Node Unavailable")
    assert drop_reason("train.tail", gone, 57.04, 600.0) == (
        "train.tail: error reply: node gone (the SuperLink stopped receiving its heartbeats), after 57.0 s "
        "(Error: Node Unavailable)")
    assert drop_reason("train.tail", Error(code=2, reason="boom"), 1.0, 600.0) == "train.tail: error reply: boom"
    assert drop_reason("train.tail", None, 600.2, 600.0) == (
        "train.tail: no reply: timed out after 600.2 s (reply-timeout 600.0 s)")
    assert drop_reason("train.tail", None, 3.0, 600.0) == (
        "train.tail: no reply after 3.0 s, before the 600.0 s reply timeout (node gone)")


def test_select_waits_for_min_nodes_then_gives_up() -> None:
    strategy = Canned(Forgetful(), 1, min_nodes=2, node_wait_timeout=0.0)
    with pytest.raises(TimeoutError, match="only 1 of the 2 required tenants"):
        strategy.select(ScriptedGrid({1: "ok"}))
    assert strategy.select(ScriptedGrid({1: "ok", 2: "ok"})) == {1, 2}


def _counts(correct: int, examples: int, tp: list[int], fp: list[int], fn: list[int]) -> RecordDict:
    return RecordDict({RecordKey.METRICS: MetricRecord({
        MetricKey.CORRECT: correct, MetricKey.NUM_EXAMPLES: examples, MetricKey.TP: tp, MetricKey.FP: fp,
        MetricKey.FN: fn})})


def test_eval_tally_weights_tenants_by_examples_or_equally() -> None:
    tally = EvalTally()
    assert tally.add(1, _counts(3, 4, [3, 0], [1, 0], [0, 1]))
    assert tally.add(1, _counts(1, 4, [1, 0], [0, 3], [3, 0]))  # a second batch of the same tenant
    assert tally.add(2, _counts(0, 2, [0, 0], [0, 2], [2, 0]))
    assert not tally.add(3, RecordDict())  # a tenant that keeps its counts
    tenants = {1: "a", 2: "b", 3: "c"}
    report = tally.report(1, "tenant", tenants, {1, 2, 3}, Exchange())
    assert report.per_tenant == {"a": 0.5, "b": 0.0}
    assert report.accuracy == pytest.approx(4 / 10)  # example-weighted over the tenants that evaluated
    assert tally.report(1, "global", tenants, {1, 2, 3}, Exchange()).accuracy == pytest.approx(0.25)
    assert report.num_examples == {"a": 8, "b": 2, "c": 0}


@pytest.mark.parametrize("content, match", [
    (_counts(1, 2, [1, 0], [0, 1], [-1, 0]), "non-negative"),
    (_counts(1, 2, [1, 0], [0], [0, 1]), "equal-length"),
    (_counts(-1, 2, [1, 0], [0, 1], [0, 1]), "metrics.correct"),
    (_counts(1, 2, [1, 0, 0], [0, 1, 0], [0, 1, 0]), "3 classes, earlier replies had 2"),
])
def test_eval_tally_refuses_bad_counts(content: RecordDict, match: str) -> None:
    tally = EvalTally()
    tally.add(1, _counts(1, 2, [1, 0], [0, 1], [0, 1]))
    with pytest.raises(ProtocolError, match=match):
        tally.add(1, content)


def test_helpers() -> None:
    assert weighted_mean({}, {}) is None
    assert weighted_mean({"a": 1.0, "b": 0.0}, {"a": 3, "b": 1}) == 0.75
    assert class_counts(_counts(1, 1, [1], [0], [0])).tolist() == [[1], [0], [0]]
    assert isinstance(class_counts(_counts(1, 1, [1], [0], [0])), np.ndarray)


def test_every_message_type_is_a_valid_flower_type() -> None:
    types = [v for k, v in vars(MessageType).items() if k.isupper()]
    assert len(types) == len(set(types))
    for message_type in types:  # SecAgg+'s plain "train" is a category's default action
        if message_type != MessageType.SECAGG:
            split_type(message_type)
    with pytest.raises(ValueError, match="expected '<train|evaluate|query>.<action>'"):
        split_type("split.head_fwd")
