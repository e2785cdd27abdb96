"""Nodes claiming the dealer role, or silent (review findings F1-F3 of branch resumegaps; fixed
in secure_admission: claimants prove the pinned key in one batched round trip of at most
QUERY_TIMEOUT, silent nodes are parked with a back-off, select re-reads the node list).

The review, as found (gap 2, the dealer re-found under the pinned key): a node that
claims the dealer role under the pinned key, which is public bytes, and then never answers
the hello check blocks ``select`` for a whole reply-timeout; the deadline is then checked
against the node list read *before* that wait, so a dealer back within node-wait-timeout is
not seen and the ServerApp fails. The claimant is never refused ("asked again later").

Failing = the attack works. Time is a fake clock: a send with a missing reply costs its
timeout, as on a real Grid (send_and_receive waits until every reply or the timeout)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

import flower_split.flower.secure_admission as admission
from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.contract import MessageType
from flower_split.flower.dealer_node import role_record
from flower_split.flower.strategy_utils import EvalReport, RoundReport

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROGUE = 7
SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 64, "max-test-samples": 16,
          "local-steps": 2, "num-server-rounds": 2, "eval-every": 0, "min-nodes": 2,
          # the defaults (flower/settings.py): 600 s each
          "reply-timeout": 600.0, "node-wait-timeout": 600.0,
          "security": "secure", "label-protection": "client", "global-eval": False}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str) -> object:  # perf_counter etc.
        import time
        return getattr(time, name)


class RogueClaimant(LocalGrid):
    """The dealer node dies after round 1 and is back, under node 9, ``back_after`` seconds
    later. At the same time a rogue node (7) joins: it answers ``query.role`` as the dealer
    with the pinned public key and never answers a hello."""

    def __init__(self, *args: object, clock: FakeClock, pinned: bytes, back_after: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.clock, self.pinned, self.back_after = clock, pinned, back_after
        self.killed_at: float | None = None
        self.hellos_to_rogue = 0
        self.silent_role = False

    def kill(self) -> None:
        self.killed_at = self.clock.now
        old = self.contexts.pop(self.dealer_node)
        self.restarted = Context(run_id=1, node_id=9, state=RecordDict(), node_config=dict(old.node_config),
                                 run_config={})
        self.contexts[ROGUE] = Context(run_id=1, node_id=ROGUE, state=RecordDict(), node_config={}, run_config={})

    def get_node_ids(self) -> list[int]:
        if self.killed_at is not None and 9 not in self.contexts \
                and self.clock.now - self.killed_at >= self.back_after:
            self.contexts[9] = self.restarted
            self.dealer_node = 9
        return list(self.contexts)

    def deliver(self, message: Message) -> Message | None:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        if node == ROGUE:
            if kind == MessageType.ROLE and not self.silent_role:
                return Message(role_record("dealer", "", self.pinned), reply_to=message)
            self.hellos_to_rogue += kind == MessageType.DEALER_HELLO
            return None  # silent
        if node not in self.contexts:
            return None
        return super().deliver(message)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.clock.sleep(0.05)  # a round trip is never free
        if len(replies) < len(messages):
            self.clock.sleep(timeout or 0.0)  # a real Grid waits the timeout for a missing reply
        return replies


@pytest.mark.parametrize("silent_role", [False, True], ids=["claims-pinned-key", "silent-new-node"])
def test_a_silent_claimant_of_the_pinned_dealer_key_does_not_make_a_short_dealer_outage_fatal(
        task_identity: None, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, silent_role: bool) -> None:
    """silent-new-node: the rogue need not even claim the role; any new node that does not
    answer ``query.role`` (a tenant SuperNode restarting slowly will do) has the same effect,
    because the deadline is judged on the node list read before the wait."""
    clock = FakeClock()
    monkeypatch.setattr(admission, "time", clock)
    keys = tmp_path / "keys"
    config = {**SECURE, "expected-dealer-key": str(keys / "dealer.pub")}
    grid = RogueClaimant(make_client_app(config), 2, dealer=keys, node_config={"state-dir": str(tmp_path / "nodes")},
                         clock=clock, pinned=b"", back_after=5.0)
    grid.silent_role = silent_role
    grid.pinned = bytes.fromhex((keys / "dealer.pub").read_text().strip())  # public: anyone can claim it
    reports: list[RoundReport | EvalReport] = []

    def on_report(report: RoundReport | EvalReport) -> None:
        reports.append(report)
        if isinstance(report, RoundReport) and report.server_round == 1:
            grid.kill()

    with caplog.at_level(logging.INFO, logger="flwr"):
        try:
            run_cloud(grid, config, on_report)
        except TimeoutError as exc:
            pytest.fail(f"the real dealer was back 5 s into a 600 s node-wait-timeout, yet the run failed after "
                        f"{clock.now - (grid.killed_at or 0):.0f} s (fake clock) with {exc!r}; the rogue node "
                        f"{ROGUE} was asked {grid.hellos_to_rogue} hello(s) and never refused")
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert len(rounds) == 2 and rounds[1].steps == 2
    assert "node 9 is the dealer again (pinned key proven)" in caplog.text


class ExtraNodeGrid(LocalGrid):
    """A LocalGrid with one more connected node, 0, on a fake clock: a round trip with a
    missing reply costs the whole timeout on that clock."""

    def __init__(self, *args: object, clock: FakeClock, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.clock, self.pinned, self.asked = clock, b"", 0
        self.contexts = {0: Context(run_id=1, node_id=0, state=RecordDict(), node_config={}, run_config={}),
                         **self.contexts}

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.clock.sleep(0.05)
        if len(replies) < len(messages):
            self.clock.sleep(timeout or 0.0)
        return replies


class EarlyRogue(ExtraNodeGrid):
    """A rogue node 0 (a lower node id than the dealer's: Flower's ids are random) answers
    ``query.role`` as the dealer under the pinned public key and never answers a hello."""

    def deliver(self, message: Message) -> Message | None:
        if message.metadata.dst_node_id == 0:
            if message.metadata.message_type == MessageType.ROLE:
                return Message(role_record("dealer", "", self.pinned), reply_to=message)
            return None
        return super().deliver(message)


def test_a_claimant_of_the_pinned_dealer_key_at_start_must_prove_it_and_cannot_lock_the_dealer_out(
        task_identity: None, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same claim at the start: ``_take_dealer`` takes the first claimant of the pinned key
    with no proof (only re-finding asks for a signed hello for a fresh name), ``_impostor_dealer``
    skips hellos that failed, and the real dealer node is refused for good as "a second dealer
    node". Pre-existing path, but the fix for gap 2 proves the key only when re-finding."""
    clock = FakeClock()
    monkeypatch.setattr(admission, "time", clock)
    keys = tmp_path / "keys"
    config = {**SECURE, "expected-dealer-key": str(keys / "dealer.pub"), "num-server-rounds": 1}
    grid = EarlyRogue(make_client_app(config), 2, dealer=keys, node_config={"state-dir": str(tmp_path / "nodes")},
                      clock=clock)
    grid.pinned = bytes.fromhex((keys / "dealer.pub").read_text().strip())
    reports: list[RoundReport | EvalReport] = []
    with caplog.at_level(logging.INFO, logger="flwr"):
        try:
            run_cloud(grid, config, reports.append)
        except TimeoutError as exc:
            pytest.fail(f"the real dealer node 3 was connected from the start, yet: {exc!r}; "
                        f"log: {[r.getMessage() for r in caplog.records if 'dealer' in r.getMessage()][:4]}")
    assert [r.server_round for r in reports if isinstance(r, RoundReport)] == [1]


class SilentNode(ExtraNodeGrid):
    """Node 0 is connected and answers nothing (not even ``query.role``)."""

    def deliver(self, message: Message) -> Message | None:
        if message.metadata.dst_node_id == 0:
            self.asked += 1
            return None
        return super().deliver(message)


def test_a_silent_node_is_not_asked_again_every_round(task_identity: None, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-existing, and the same mechanism as above: a new node that never answers
    ``query.role`` is never refused, so each ``select`` (every round) asks it again and waits
    a whole reply-timeout (600 s by default) before any tenant trains."""
    clock = FakeClock()
    monkeypatch.setattr(admission, "time", clock)
    config = {**SECURE, "num-server-rounds": 3}
    grid = SilentNode(make_client_app(config), 2, dealer=tmp_path / "keys",
                      node_config={"state-dir": str(tmp_path / "nodes")}, clock=clock)
    run_cloud(grid, config)
    assert grid.asked <= 1, f"the silent node was asked {grid.asked} times, {clock.now:.0f} s of waiting in 3 rounds"
