"""Conversations at each node's own pace (``flower.stream.converse``) over Flower's push/pull Grid API.

A scripted Grid makes the order of events deterministic: a pushed message's reply is there at
the next pull. Each reply must be answered and the node's next message pushed before the next
reply is answered (so that node computes while the cloud answers the others); errors, missing
replies past the timeout and messages that could not be pushed end that node's part only.
"""

from __future__ import annotations

from typing import Iterable
from uuid import uuid4

from flwr.app import ConfigRecord, Error, Message, RecordDict

import pytest

from flower_helpers import LocalGrid, StubGrid
from flower_split.config import ConfigError
from flower_split.flower.metering import MeteredGrid
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.stream import HTTP_PAUSE, MIN_PAUSE, converse, gather, poll_pause, shares_machine


class PacedGrid(StubGrid):
    """Replies echo the content with the node's count of messages so far; ``silent`` nodes never
    reply, ``failing`` ones reply with an error, ``unpushable`` ones cannot be pushed to."""

    def __init__(self, silent: Iterable[int] = (), failing: Iterable[int] = (), unpushable: Iterable[int] = ()) -> None:
        self.silent, self.failing, self.unpushable = set(silent), set(failing), set(unpushable)
        self.ready: dict[str, Message] = {}
        self.events: list[tuple[str, int, int]] = []  # ("push" | "answer", node, its message count)
        self.count: dict[int, int] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.count[node] = self.count.get(node, 0) + 1
            self.events.append(("push", node, self.count[node]))
            if node in self.unpushable:
                continue
            mid = uuid4().hex
            message.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            if node in self.failing:
                self.ready[mid] = Message(Error(code=0, reason="refused"), reply_to=message)
            elif node not in self.silent:
                self.ready[mid] = Message(RecordDict({"n": ConfigRecord({"n": self.count[node]})}), reply_to=message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.ready.pop(mid) for mid in list(message_ids) if mid in self.ready]

    def get_node_ids(self) -> Iterable[int]:
        return list(self.count)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError("converse pushes and pulls")


def _opening(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=node, message_type="train.x", group_id="1") for node in nodes]


def test_each_reply_is_answered_at_once_and_the_node_goes_on_at_its_own_pace(task_identity: None) -> None:
    grid = PacedGrid()
    turns = {1: 3, 2: 1, 3: 2}  # how many messages each node gets

    def answer(node: int, reply: Message) -> Message | None:
        n = reply.content["n"]["n"]
        grid.events.append(("answer", node, n))
        return _opening([node])[0] if n < turns[node] else None

    failures: list = []
    sent = converse(grid, _opening(turns), answer, lambda *a: failures.append(a), timeout=5.0)
    assert dict(sent) == turns and not failures
    # node 1's second message leaves before node 2's first reply is answered: no lockstep
    assert grid.events.index(("push", 1, 2)) < grid.events.index(("answer", 2, 1))
    for node, last in turns.items():  # and every node's replies are answered in its own order
        assert [n for kind, m, n in grid.events if kind == "answer" and m == node] == list(range(1, last + 1))


def test_errors_lost_replies_and_failed_pushes_end_only_that_nodes_part(task_identity: None) -> None:
    grid = PacedGrid(silent={2}, failing={3}, unpushable={4})
    failures: dict[int, tuple] = {}

    def answer(node: int, reply: Message) -> Message | None:
        n = reply.content["n"]["n"]
        return _opening([node])[0] if n < 2 else None

    def fail(node: int, error: Error | None, waited: float) -> None:
        failures[node] = (error.reason if error is not None else None, waited)

    sent = converse(grid, _opening([1, 2, 3, 4]), answer, fail, timeout=0.05)
    assert dict(sent) == {1: 2, 2: 1, 3: 1, 4: 1}  # node 1 went on; the others stopped at once
    assert set(failures) == {2, 3, 4}
    assert failures[2][0] is None and failures[2][1] > 0.05  # no reply: after the timeout
    assert failures[3][0] == "refused"
    assert failures[4] == (None, 0.0)  # never pushed


class LateGrid(PacedGrid):
    """A reply becomes visible only at the ``late``-th pull after its push (counted per grid)."""

    def __init__(self, late: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.late, self.pulls = late, 0

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        return [] if self.pulls < self.late else super().pull_messages(message_ids)


def test_gather_returns_every_reply_once_they_have_all_come(task_identity: None) -> None:
    grid = LateGrid(late=4)
    replies = gather(grid, _opening([1, 2, 3]), timeout=None)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert grid.pulls == 4  # polled until they came, then stopped


def test_gather_gives_up_on_silent_and_unpushable_nodes_after_the_timeout(task_identity: None) -> None:
    grid = PacedGrid(silent={2}, failing={3}, unpushable={4})
    replies = gather(grid, _opening([1, 2, 3, 4]), timeout=0.05)
    assert sorted((r.metadata.src_node_id, r.has_error()) for r in replies) == [(1, False), (3, True)]
    assert gather(PacedGrid(silent={1}), _opening([1]), timeout=0.0) == []


def test_the_pace_follows_where_the_parties_run() -> None:
    """``step-pace = auto``: lockstep where every party shares the ServerApp's machine (the
    in-process grid, Flower's simulation), streamed over any other grid; wrappers see through."""
    local = LocalGrid(lambda message, context: None, 1)
    assert shares_machine(local) and shares_machine(MeteredGrid(local))
    assert not shares_machine(PacedGrid()) and poll_pause(MeteredGrid(PacedGrid())) == MIN_PAUSE
    assert HTTP_PAUSE > MIN_PAUSE
    with pytest.raises(ConfigError, match="step-pace"):
        settings_from_run_config({"step-pace": "sometimes"})
