"""The ServerApp writes results.json itself (run-config ``results-dir``): a deployment discards its context."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, RecordDict

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import make_server_app
from flower_split.state.results import RESULTS_FILE
from flower_helpers import LocalGrid

TINY = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
        "batch-size": 16, "max-train-samples": 96, "max-test-samples": 48, "local-steps": 2, "micro-batches": 1,
        "num-server-rounds": 2, "eval-every": 0, "global-eval": False, "min-nodes": 2, "reply-timeout": 60.0}


def test_the_server_app_writes_results_json_when_asked(tmp_path: Path, task_identity: None) -> None:
    out = tmp_path / "results"
    grid = LocalGrid(make_client_app(TINY), 2)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**TINY, "results-dir": str(out)})
    make_server_app()(grid, context)
    run = json.loads((out / RESULTS_FILE).read_text())["runs"][0]
    assert (run["name"], run["strategy"], run["runtime"], run["num_clients"]) == ("split-plain", "split", "deployment", 2)
    assert [r["round"] for r in run["rounds"]] == [1, 2] and run["num_server_rounds"] == 2
    first = run["rounds"][0]
    assert first["round_trips"] == 6 and first["round_trips_per_step"] == 3.0  # 2 steps, one per message
    assert first["wall_seconds"] > 0 and first["bytes_up"] > 0 and first["flower_wait_seconds"] is not None
    assert sorted(run["per_tenant_accuracy"]) == ["tenant-0", "tenant-1"] and run["test_accuracy"] is not None
    assert run["config"]["model"] == "tiny" and run["flower"]["results_dir"] == str(out)
    assert [p.name for p in out.iterdir()] == [RESULTS_FILE]  # no temp file left behind
    assert "round-1" in context.state  # the simulation's record is kept as before


def test_without_results_dir_nothing_is_written(tmp_path: Path, task_identity: None, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = {**TINY, "num-server-rounds": 1}
    make_server_app()(LocalGrid(make_client_app(config), 2),
                      Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    assert not list(tmp_path.rglob(RESULTS_FILE))
