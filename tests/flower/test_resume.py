"""Resume over Flower: a restarted node picks up from its own disk, a restarted ServerApp from
its checkpoint, and nothing but the message in flight is lost (in-process grid, real ClientApps).

A SuperNode that dies loses its ``context.state``; here the test empties it, which is exactly
what Flower's node state looks like after a restart. A ServerApp that dies ends its run; here
the grid raises mid-round, and a new ServerApp (and new node contexts, as in a new run of the
same ``session``) resumes from what each party saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.config import ConfigError
from flower_split.flower.contract import MessageType
from flower_split.flower.plain_handlers import PARTY_ARRAYS, PARTY_CONFIG
from flower_split.flower.context_state import records_to_state
from flower_split.protocol.secure_messages import RESUME_STEP_GAP
from flower_split.flower.strategy_utils import EvalReport, RoundReport
from flower_split.state import StateError, read_party
from flower_split.state.codec import digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAIN = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 8, "tail-bottleneck": 16,
         "lr-head": 0.02, "lr-tail": 0.3, "batch-size": 16, "max-train-samples": 128, "max-test-samples": 64,
         "local-steps": 2, "micro-batches": 2, "num-server-rounds": 3, "eval-every": 0, "eval-initial": False,
         "global-eval": False, "min-nodes": 2, "reply-timeout": 120.0}
SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 96, "max-test-samples": 32,
          "local-steps": 2, "num-server-rounds": 2, "eval-every": 0, "min-nodes": 2, "reply-timeout": 60.0,
          "security": "secure", "label-protection": "client", "global-eval": False}


class Killer:
    """An ``intercept`` that kills a node (empties its state; the message in flight is lost)
    at its ``at``-th message of type ``kind``."""

    def __init__(self, node: int, kind: str, at: int) -> None:
        self.node, self.kind, self.at, self.seen = node, kind, at, 0
        self.grid: LocalGrid | None = None

    def __call__(self, node: int, kind: str) -> str | None:
        if node == self.node and kind == self.kind:
            self.seen += 1
            if self.seen == self.at:
                assert self.grid is not None
                state = self.grid.contexts[node].state
                for key in list(state.keys()):
                    del state[key]
                return "silent"
        return None


def _plain_run(tmp_path: Path, node_config: dict) -> tuple[list[RoundReport], LocalGrid]:
    reports: list[RoundReport | EvalReport] = []
    killer = Killer(1, MessageType.TAIL, at=2)  # round 2's tail stage: tenant-0's node dies
    grid = LocalGrid(make_client_app(PLAIN), 2, intercept=killer, node_config=node_config)
    killer.grid = grid
    run_cloud(grid, PLAIN, reports.append)
    return [r for r in reports if isinstance(r, RoundReport)], grid


def _party_steps(context: Context) -> int:
    """Tail updates the tenant has made (its LR schedule's count)."""
    return int(records_to_state(context.state[PARTY_ARRAYS], context.state[PARTY_CONFIG])["tail_schedule"]["last_epoch"])


def test_a_restarted_node_resumes_from_its_own_disk(task_identity: None, tmp_path) -> None:
    rounds, grid = _plain_run(tmp_path, {"state-dir": str(tmp_path / "nodes")})
    assert "tenant-0" in rounds[1].dropped  # it died in round 2
    assert rounds[2].tenants == ["tenant-0", "tenant-1"] and not rounds[2].dropped  # and came back
    # round 1's two steps and round 2's forward were kept; only the step in flight was lost
    assert _party_steps(grid.contexts[1]) == _party_steps(grid.contexts[2]) - 2 > 0
    mirror = read_party(tmp_path / "nodes" / "run-1" / "tenants" / "tenant-0", "node")
    assert digest(mirror.state) and (mirror.directory / "party.json").stat().st_mode & 0o077 == 0


def test_without_a_state_dir_a_restarted_node_refuses_a_silent_fresh_start(task_identity: None,
                                                                            tmp_path) -> None:
    rounds, grid = _plain_run(tmp_path, {})
    assert "tenant-0" in rounds[1].dropped
    assert "refusing a silent fresh start" in rounds[2].dropped["tenant-0"]
    assert PARTY_ARRAYS not in grid.contexts[1].state  # nothing fresh was created either


def test_a_corrupt_mirror_is_an_error_never_a_fresh_start(task_identity: None, tmp_path) -> None:
    rounds, grid = _plain_run(tmp_path, {"state-dir": str(tmp_path / "nodes")})
    meta = tmp_path / "nodes" / "run-1" / "tenants" / "tenant-0" / "party.json"
    meta.write_text("{not json")
    for key in list(grid.contexts[1].state.keys()):
        del grid.contexts[1].state[key]
    reply = make_client_app(PLAIN)(*_head_fwd_to(grid.contexts[1]))
    assert reply.has_error() and "StateError" in reply.error.reason and "party.json" in reply.error.reason
    with pytest.raises(StateError):
        read_party(meta.parent, "node")


class CloudCrash(Exception):
    """The ServerApp process dies."""


def test_secure_run_resumes_after_the_cloud_and_every_node_restart(task_identity: None, tmp_path, caplog) -> None:
    config = {**SECURE, "state-dir": str(tmp_path / "cloud"), "session": "bank-a"}
    nodes = {"state-dir": str(tmp_path / "nodes")}
    begins = {"n": 0}

    def crash_in_round_2(node: int, kind: str) -> str | None:
        if node == 1 and kind == MessageType.SECURE_TRAIN_BEGIN:
            begins["n"] += 1
        if node == 1 and kind == MessageType.SECURE_TRAIN_NEXT and begins["n"] == 4:  # round 2, step 2
            raise CloudCrash
        return None

    first = LocalGrid(make_client_app(config), 2, dealer=tmp_path / "keys", node_config=nodes,
                      intercept=crash_in_round_2)
    with pytest.raises(CloudCrash):
        run_cloud(first, config)
    saved = read_party(tmp_path / "cloud" / "bank-a" / "cloud", "cloud")
    assert saved.meta["completed_round"] == 1  # saved mid-round 2 (after its step 1): round 1 complete
    before = {t: r["halves"]["updates"] for t, r in saved.state["cloud"]["tenants"].items()}
    assert before == {t: {"head": 3, "tail": 3} for t in ("tenant-0", "tenant-1")}  # 2 + 1 steps each

    # every process restarts: new contexts (a new run of the same session), same disks and keys;
    # and node 0, registered too, claims tenant-0 first (hostile review H2): it must prove the key
    app = make_client_app(config)

    def with_impostor(message: Message, context: Context) -> Message:
        if context.node_id == 0 and message.metadata.message_type == MessageType.SECURE_RESUME:
            return Message(RecordDict({"resume": ConfigRecord({"proof": bytes(32)})}), reply_to=message)
        return app(message, context)

    second = LocalGrid(with_impostor, 2, node_config=nodes)
    for node, context in first.contexts.items():
        second.contexts[node] = Context(run_id=2, node_id=node, node_config=dict(context.node_config),
                                        state=RecordDict(), run_config={})
    second.contexts = {0: Context(run_id=2, node_id=0, state=RecordDict(), run_config={},
                                  node_config={**first.contexts[1].node_config, "state-dir": str(tmp_path / "rogue")}),
                       **second.contexts}
    reports: list[RoundReport | EvalReport] = []
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_cloud(second, config, reports.append)
    assert "node 0 refused: claims resumed tenant 'tenant-0' without proving its key" in caplog.text
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert [r.server_round for r in rounds] == [2]  # round 1 is not trained again
    assert rounds[0].steps == 2 and not rounds[0].dropped and rounds[0].tenants == ["tenant-0", "tenant-1"]
    after = read_party(tmp_path / "cloud" / "bank-a" / "cloud", "cloud").state["cloud"]["tenants"]
    for tenant, record in after.items():
        # nothing lost, nothing extra: round 2 ran only its missing step, 2 rounds x 2 steps in all;
        # the step numbers jumped past any used before the crash
        assert record["halves"]["updates"] == {"head": 4, "tail": 4}
        assert record["next_step"] >= RESUME_STEP_GAP
    dealer = read_party(tmp_path / "nodes" / "bank-a" / "dealer", "node")
    assert dealer.state  # the dealer node resumed from its own disk too (its material checks passed)


@pytest.mark.parametrize("victim, kind, mirror", [(1, MessageType.SECURE_TRAIN_NEXT, True),
                                                  (3, MessageType.DEALER_MATERIAL, True),
                                                  (3, MessageType.DEALER_MATERIAL, False)])
def test_secure_tenant_or_dealer_node_killed_mid_round_resumes(task_identity: None, tmp_path, victim: int,
                                                                kind: str, mirror: bool) -> None:
    """kill of a tenant node (mid-step) or of the dealer node (mid-request) in round 2 of 3: the
    message in flight is lost, and round 3 runs whole, every tenant with halves consistent with
    the cloud's (the reconcile at every begin refuses anything else). Without ``state-dir`` (the
    control) the restarted dealer knows no tenant and round 3 fails for all of them."""
    config = {**SECURE, "num-server-rounds": 3}
    killer = Killer(victim, kind, at=2)
    grid = LocalGrid(make_client_app(config), 2, dealer=tmp_path / "keys",
                     node_config={"state-dir": str(tmp_path / "nodes")} if mirror else {},
                     intercept=lambda node, message_type: killer(node, message_type) if reports else None)
    killer.grid = grid
    reports: list[RoundReport | EvalReport] = []  # counting starts once round 1 is reported
    run_cloud(grid, config, reports.append)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert killer.seen >= killer.at  # the kill happened in round 2
    if victim == 1:
        assert "tenant-0" in rounds[1].dropped
    if not mirror:
        assert sorted(rounds[2].dropped) == ["tenant-0", "tenant-1"]
        return
    assert not rounds[2].dropped and rounds[2].tenants == ["tenant-0", "tenant-1"] and rounds[2].steps == 2
    evaluation = [r for r in reports if isinstance(r, EvalReport)][-1]
    assert sorted(evaluation.per_tenant) == ["tenant-0", "tenant-1"] and not evaluation.dropped



def test_two_live_runs_of_one_session_never_both_act(task_identity: None, tmp_path) -> None:
    """A cloud that starts a second run of a live session gets a second copy of each tenant
    (loaded from its mirror): both would use the same step numbers on other inputs (hostile
    review C1). Whichever writes the mirror first wins; the other copy is refused from then on."""
    config = {**PLAIN, "session": "s", "num-server-rounds": 1}
    grid = LocalGrid(make_client_app(config), 2, node_config={"state-dir": str(tmp_path / "nodes")})
    run_cloud(grid, config)
    app = make_client_app(config)
    live = grid.contexts[1]
    second = Context(run_id=2, node_id=1, node_config=dict(live.node_config), state=RecordDict(), run_config={})
    assert not app(*_head_fwd_to(second)).has_error()  # the second run loads the mirror and acts first
    refused = app(*_head_fwd_to(live))
    assert refused.has_error() and "written by another run or process" in refused.error.reason
    assert not app(*_head_fwd_to(second)).has_error()  # the copy that wrote last goes on


def _head_fwd_to(context: Context) -> tuple:
    content = RecordDict({"config": ConfigRecord({"num-batches": 1, "server-round": 9, "known": True})})
    return Message(content, 1, MessageType.HEAD_FWD), context


def test_a_trained_secure_tenant_refuses_a_new_setup(task_identity: None, tmp_path, caplog) -> None:
    """A cloud that lost its checkpoint (or never had one) starts the same session afresh and
    sets everyone up again: a tenant holding a trained party refuses rather than discard it
    (hostile review M1); its mirror keeps the trained halves."""
    config = {**SECURE, "session": "bank-a", "num-server-rounds": 1}
    nodes = {"state-dir": str(tmp_path / "nodes")}
    first = LocalGrid(make_client_app(config), 2, dealer=tmp_path / "keys", node_config=nodes)
    run_cloud(first, config)
    mirror = tmp_path / "nodes" / "bank-a" / "tenants" / "tenant-0"
    before = digest(read_party(mirror, "node").state["secure.arrays"])
    second = LocalGrid(make_client_app(config), 2, node_config=nodes)
    second.contexts = {node: Context(run_id=2, node_id=node, node_config=dict(c.node_config), state=RecordDict(),
                                     run_config={}) for node, c in first.contexts.items()}
    with pytest.raises(TimeoutError), caplog.at_level(logging.WARNING, logger="flwr"):
        run_cloud(second, {**config, "reply-timeout": 5.0, "node-wait-timeout": 1.0})  # nobody set up: min-nodes unmet
    assert caplog.text.count("holds a trained secure party; a new set-up would discard it") >= 2
    assert digest(read_party(mirror, "node").state["secure.arrays"]) == before


def test_resuming_a_finished_session_is_refused(task_identity: None, tmp_path) -> None:
    config = {**PLAIN, "session": "done", "num-server-rounds": 1, "state-dir": str(tmp_path / "cloud")}
    nodes = {"state-dir": str(tmp_path / "nodes")}
    run_cloud(LocalGrid(make_client_app(config), 2, node_config=nodes), config)
    with pytest.raises(ConfigError, match="has completed 1 rounds already: raise num-server-rounds"):
        run_cloud(LocalGrid(make_client_app(config), 2, node_config=nodes), config)


def test_a_tenant_dropped_mid_step_moves_past_the_number_dealt_ahead(task_identity: None, tmp_path) -> None:
    """issue 17, gap 1: a tenant killed mid-step in round 2, after the cloud had asked the dealer
    ahead for its next training step, begins an evaluation next. The number dealt ahead is spent
    (the dealer deals a number once), so before the fix the cloud refused the evaluation's first
    message ("does not match the shape it announced") and dropped the tenant once more; now the
    begin tells the tenant the number and it moves past it, opening nothing under it."""
    config = {**SECURE, "eval-every": 1}
    killer = Killer(1, MessageType.SECURE_TRAIN_NEXT, at=2)  # round 2, step 1: its material ahead was dealt
    grid = LocalGrid(make_client_app(config), 2, dealer=tmp_path / "keys",
                     node_config={"state-dir": str(tmp_path / "nodes")},
                     intercept=lambda node, message_type: killer(node, message_type) if reports else None)
    killer.grid = grid
    reports: list[RoundReport | EvalReport] = []
    run_cloud(grid, config, reports.append)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert "tenant-0" in rounds[1].dropped and rounds[1].steps == 2
    evaluation = [r for r in reports if isinstance(r, EvalReport)][-1]
    assert evaluation.server_round == 2 and not evaluation.dropped
    assert sorted(evaluation.per_tenant) == ["tenant-0", "tenant-1"]


def test_a_restarted_node_whose_first_message_is_a_sharing_setup_resumes(task_identity: None, tmp_path) -> None:
    """A SecAgg+ set-up is the first message a restarted node gets (its state emptied just before
    it): the stage runs on the tenant's mirrored state, and the node's later messages are not
    refused as if another process had written its mirror (docs/secure.md §10)."""
    config = {**PLAIN, "share": "tail", "num-server-rounds": 2, "min-nodes": 3}
    restarted: list[int] = []

    def intercept(node: int, kind: str) -> str | None:
        if node == 1 and kind == "train" and not restarted:  # round 1's set-up: tenant-0's node restarted
            state = grid.contexts[1].state
            for key in list(state.keys()):
                del state[key]
            restarted.append(node)
        return None

    grid = LocalGrid(make_client_app(config), 3, intercept=intercept,
                     node_config={"state-dir": str(tmp_path / "nodes"), "share-min-tenants": 3,
                                  "allow-unpinned-sharing": True})
    reports: list[RoundReport | EvalReport] = []
    run_cloud(grid, config, reports.append)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert restarted == [1]
    assert rounds[0].sharing.tenants == ["tenant-0", "tenant-1", "tenant-2"] and not rounds[0].sharing.dropped
    assert rounds[1].tenants == ["tenant-0", "tenant-1", "tenant-2"] and not rounds[1].dropped
    assert rounds[1].sharing.tenants == ["tenant-0", "tenant-1", "tenant-2"]


def test_a_node_restarted_mid_evaluation_reads_its_labels_from_its_mirror(task_identity: None, tmp_path) -> None:
    """A tenant node that restarts between two messages of a secure evaluation step (nothing lost)
    picks the step up from its mirror, whose Arrays are stored raw, and scores it: the labels
    and row indices are read as state tensors (hostile review: they were read as Flower ``.npy``
    Arrays, so every restored evaluation step failed)."""
    config = {**SECURE, "num-server-rounds": 1, "eval-every": 1}
    grid: LocalGrid | None = None
    restarts: list[int] = []

    def restart(node: int, kind: str) -> None:
        if node == 1 and kind == MessageType.SECURE_EVAL_NEXT and not restarts:
            assert grid is not None
            state = grid.contexts[node].state
            for key in list(state.keys()):
                del state[key]
            restarts.append(node)
        return None

    grid = LocalGrid(make_client_app(config), 2, dealer=tmp_path / "keys",
                     node_config={"state-dir": str(tmp_path / "nodes")}, intercept=restart)
    reports: list[RoundReport | EvalReport] = []
    run_cloud(grid, config, reports.append)
    evaluation = [r for r in reports if isinstance(r, EvalReport)][-1]
    assert restarts == [1]
    assert sorted(evaluation.per_tenant) == ["tenant-0", "tenant-1"] and not evaluation.dropped
