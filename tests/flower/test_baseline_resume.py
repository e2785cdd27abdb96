"""A FedAvg-family baseline that is stopped mid-run and started again with the same session goes
on after its last saved round and ends exactly where an uninterrupted run ends (issue 18: a
converged MiniLM baseline takes longer than a session). In process on the tiny model, through
Flower's strategies and the real ClientApp; the stop is an exception in the middle of a round,
as a killed ServerApp leaves it: some tenants have trained that round, others have not."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flower_split.flower.fedavg_client_app import LOCAL_MODEL, make_fedavg_client_app, prepare
from flower_split.flower.fedavg_server_app import run_fedavg_cloud
from flower_split.flower.fedavg_settings import fedavg_settings_from_run_config
from flower_split.flower.metering import cost_mod
from flower_split.flower.results import Collector, run_entry
from flower_split.runs.simulate import _add_warm_up, warm_up
from flower_split.state import StateError, write_party
from flower_helpers import LocalGrid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"model": "tiny", "device": "cpu", "partition": "iid", "lr": 0.01, "batch-size": 16,
        "max-train-samples": 64, "max-test-samples": 32, "num-server-rounds": 3, "eval-every": 1,
        "global-eval": True, "min-nodes": 2, "reply-timeout": 120.0, "session": "baseline"}


class Killed(BaseException):
    """The ServerApp's process dies (nothing in the strategy may catch it)."""


def _dies_at(client: Callable[[Message, Context], Message], server_round: int,
             node: int) -> Callable[[Message, Context], Message]:
    """``client``, except that the process dies when node ``node`` gets round ``server_round``'s
    training message (the nodes before it in that round have trained it)."""
    def app(message: Message, context: Context) -> Message:
        config = message.content.get("config")
        if (message.metadata.message_type == "train" and message.metadata.dst_node_id == node
                and isinstance(config, ConfigRecord) and config.get("server-round") == server_round):
            raise Killed
        return client(message, context)

    return app


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("baseline", ["fedavg", "fedprox"])
def test_a_stopped_baseline_resumes_and_ends_where_an_uninterrupted_one_ends(
        task_identity: None, tmp_path: Path, baseline: str) -> None:
    values = {**TINY, "baseline": baseline, "state-dir": str(tmp_path / "cloud"),
              **({"proximal-mu": 0.1} if baseline == "fedprox" else {})}
    whole = {**values, "state-dir": str(tmp_path / "whole")}
    history, result = run_fedavg_cloud(LocalGrid(make_fedavg_client_app(whole), 2), whole)

    with pytest.raises(Killed):  # dies in round 3, after node 1 trained it
        run_fedavg_cloud(LocalGrid(_dies_at(make_fedavg_client_app(values), 3, 2), 2), values)
    sent: list[Message] = []

    def watched(message: Message, context: Context) -> Message:
        sent.append(message)
        return make_fedavg_client_app(values)(message, context)

    resumed, resumed_result = run_fedavg_cloud(LocalGrid(watched, 2), values)
    trains = [m.content["config"]["server-round"] for m in sent if m.metadata.message_type == "train"]
    assert trains == [3, 3]  # rounds 1 and 2 are not run again; round 3 is, on every tenant
    assert _same(_state(resumed_result.arrays), _state(result.arrays))  # the same final global model
    assert [r.server_round for r in resumed.rounds] == [1, 2, 3]
    assert [r.per_tenant_loss for r in resumed.rounds] == [r.per_tenant_loss for r in history.rounds]
    assert [e.per_tenant for e in resumed.evaluations] == [e.per_tenant for e in history.evaluations]
    assert [g.accuracy for g in resumed.global_evaluations] == [g.accuracy for g in history.global_evaluations]

    # a finished session started again runs no round and changes nothing
    sent.clear()
    again, again_result = run_fedavg_cloud(LocalGrid(watched, 2), values)
    assert not [m for m in sent if m.metadata.message_type == "train"]
    assert [r.server_round for r in again.rounds] == [1, 2, 3] and not len(again_result.arrays)


def test_local_only_tenants_resume_their_own_models(task_identity: None, tmp_path: Path) -> None:
    values = {**TINY, "baseline": "local-only", "global-eval": False, "state-dir": str(tmp_path / "cloud")}
    whole_grid = LocalGrid(make_fedavg_client_app(values), 2, node_config={"state-dir": str(tmp_path / "w")})
    whole, _ = run_fedavg_cloud(whole_grid, {**values, "state-dir": str(tmp_path / "wc")})

    nodes = {"state-dir": str(tmp_path / "nodes")}
    with pytest.raises(Killed):  # node 1 has trained round 2, node 2 has not
        run_fedavg_cloud(LocalGrid(_dies_at(make_fedavg_client_app(values), 2, 2), 2, node_config=nodes), values)
    grid = LocalGrid(make_fedavg_client_app(values), 2, node_config=nodes)  # restarted nodes: empty state
    resumed, _ = run_fedavg_cloud(grid, values)
    for node in (1, 2):
        assert _same(_state(grid.contexts[node].state[LOCAL_MODEL]), _state(whole_grid.contexts[node].state[LOCAL_MODEL]))
    assert [e.per_tenant for e in resumed.evaluations] == [e.per_tenant for e in whole.evaluations]

    # an older round than the tenant's last is a replayed message: refused, the model kept
    kept = _state(grid.contexts[1].state[LOCAL_MODEL])
    old = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(
        {"local-epochs": 1, "server-round": 1, "local-only": True})})
    reply = grid.client_app(Message(old, 1, "train"), grid.contexts[1])
    assert reply.has_error() and "older than this tenant's last training round" in reply.error.reason
    assert _same(_state(grid.contexts[1].state[LOCAL_MODEL]), kept)


def test_a_saved_state_of_another_run_is_refused(task_identity: None, tmp_path: Path) -> None:
    values = {**TINY, "num-server-rounds": 1, "global-eval": False, "state-dir": str(tmp_path)}
    run_fedavg_cloud(LocalGrid(make_fedavg_client_app(values), 2), values)
    retuned = {**values, "lr": 0.02}
    with pytest.raises(StateError, match="saved under another run config"):
        run_fedavg_cloud(LocalGrid(make_fedavg_client_app(retuned), 2), retuned)
    other = {**values, "baseline": "fedprox", "proximal-mu": 0.1}
    with pytest.raises(StateError, match="saved by a 'fedavg-lora' run, this run is 'fedprox-lora'"):
        run_fedavg_cloud(LocalGrid(make_fedavg_client_app(other), 2), other)
    # where state goes and how long to wait are not part of the run: a new timeout resumes
    patient = {**values, "reply-timeout": 600.0}
    history, _ = run_fedavg_cloud(LocalGrid(make_fedavg_client_app(patient), 2), patient)
    assert [r.server_round for r in history.rounds] == [1]
    split = {**values, "session": "split"}  # a split cloud's state under the same name
    write_party(tmp_path / "split" / "cloud", "cloud", {}, {"security": "plain", "completed_round": 1})
    with pytest.raises(StateError, match="saved by a split cloud"):
        run_fedavg_cloud(LocalGrid(make_fedavg_client_app(split), 2), split)


def _collected_run(values: dict, client: Callable[[Message, Context], Message] | None = None) -> dict:
    config, settings, fedavg = fedavg_settings_from_run_config(values)
    collector = Collector(fedavg.run_name, "fedavg", settings, 2, progress=False, warm_up=warm_up)
    app = _add_warm_up(make_fedavg_client_app(values, mods=[cost_mod(lambda c: prepare(c, values))]))
    run_fedavg_cloud(collector.wrap(LocalGrid(client(app) if client else app, 2)), values, collector.on_report,
                     journal=collector)
    return run_entry(fedavg.run_name, "fedavg", config, settings, fedavg, 2, collector.collected, 1.0)


def test_a_resumed_run_entry_has_every_round_and_each_tenant_once(task_identity: None, tmp_path: Path) -> None:
    values = {**TINY, "state-dir": str(tmp_path)}
    with pytest.raises(Killed):
        _collected_run(values, lambda app: _dies_at(app, 3, 2))
    run = _collected_run(values)
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3] and run["rounds_run"] == 3
    assert all(r["client_cpu_seconds"] > 0 and r["bytes_up"] > 0 for r in run["rounds"])
    assert [c["tenant"] for c in run["clients"]] == ["tenant-0", "tenant-1"]  # new node ids, summed by tenant
    rounds_cpu = sum(r["client_cpu_seconds"] for r in run["rounds"])
    assert run["client_train_cpu_seconds"] == pytest.approx(rounds_cpu)
    assert isinstance(run["test_accuracy"], float)


def test_four_tenants_resume_to_the_same_bits_whatever_order_the_replies_come_in(
        task_identity: None, tmp_path: Path) -> None:
    """Flower samples the nodes in a random order and sums the weighted arrays in reply order; the
    strategy sorts the replies by tenant, so a resumed run (which replays no RNG state) averages in
    the same order as the uninterrupted one. With two tenants any order gives the same float sum."""
    values = {**TINY, "min-nodes": 4, "max-train-samples": 96, "global-eval": False, "num-server-rounds": 4,
              "state-dir": str(tmp_path / "cloud")}
    whole = {**values, "state-dir": str(tmp_path / "whole")}
    _, result = run_fedavg_cloud(LocalGrid(make_fedavg_client_app(whole), 4), whole)
    with pytest.raises(Killed):
        run_fedavg_cloud(LocalGrid(_dies_at(make_fedavg_client_app(values), 3, 2), 4), values)
    _, resumed = run_fedavg_cloud(LocalGrid(make_fedavg_client_app(values), 4), values)
    assert _same(_state(resumed.arrays), _state(result.arrays))


def test_a_round_no_tenant_trained_is_not_saved(task_identity: None, tmp_path: Path) -> None:
    """Local-only tenants restarted without their mirrored models (no node state-dir) cannot train
    the resumed round: the run stops and the state saved after the last good round stays."""
    values = {**TINY, "baseline": "local-only", "global-eval": False, "state-dir": str(tmp_path)}
    with pytest.raises(Killed):
        run_fedavg_cloud(LocalGrid(_dies_at(make_fedavg_client_app(values), 2, 2), 2), values)
    saved = (tmp_path / "baseline" / "cloud" / "party.json").read_bytes()
    with pytest.raises(StateError, match="round 2: no tenant trained .*has no model yet.* after round 1"):
        run_fedavg_cloud(LocalGrid(make_fedavg_client_app(values), 2), values)
    assert (tmp_path / "baseline" / "cloud" / "party.json").read_bytes() == saved


def test_a_state_dir_that_cannot_be_written_is_refused_before_round_1(task_identity: None, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    values = {**TINY, "state-dir": str(tmp_path / "file" / "state")}
    sent: list[Message] = []

    def watched(message: Message, context: Context) -> Message:
        sent.append(message)
        return make_fedavg_client_app(values)(message, context)

    with pytest.raises(StateError, match="not writable"):
        run_fedavg_cloud(LocalGrid(watched, 2), values)
    assert not sent


def test_a_finished_run_started_again_keeps_its_wall_time(task_identity: None, tmp_path: Path) -> None:
    values = {**TINY, "state-dir": str(tmp_path)}
    first = _collected_run(values)
    again = _collected_run(values)  # no round left: nothing new is reported
    assert again["rounds_run"] == 3 and again["test_accuracy"] == first["test_accuracy"]
    assert 0 <= again["wall_seconds"] - first["wall_seconds"] < 60


def test_compare_keeps_the_session_when_only_a_wait_changes(tmp_path: Path) -> None:
    from flower_split.runs.compare import checkpoint_location

    inputs = {"run_config": {**TINY, "lr": 0.01}, "num_clients": 2}
    where, session = checkpoint_location(tmp_path, "fedavg", inputs)
    patient = {**inputs, "run_config": {**inputs["run_config"], "reply-timeout": 3600.0}}
    assert checkpoint_location(tmp_path / "elsewhere", "fedavg", patient)[1] == session
    retuned = {**inputs, "run_config": {**inputs["run_config"], "lr": 0.02}}
    assert checkpoint_location(tmp_path, "fedavg", retuned)[1] != session
    assert checkpoint_location(tmp_path, "fedavg", {**inputs, "num_clients": 3})[1] != session
    assert checkpoint_location(tmp_path, "fedprox", inputs)[1] != session and where == tmp_path.resolve() / "state"
