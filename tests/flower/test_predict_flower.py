"""Inference over Flower on the tenants' own texts (run config ``predict``): after a training
run, every process restarted (new contexts, a new run of the same session), each tenant's
node classifies its own ``predict-input`` into its own ``predict-output`` with the state its
disk kept; given its test texts, its predictions score exactly the accuracy the training run's
last evaluation reported (plain; secure within one text: 2PC truncation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.config import ConfigError
from flower_split.flower.node_data import node_rows, node_source, run_labels
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.strategy_utils import EvalReport

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAIN = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 8, "tail-bottleneck": 16,
         "lr-head": 0.02, "lr-tail": 0.3, "batch-size": 16, "max-train-samples": 128, "max-test-samples": 64,
         "local-steps": 2, "micro-batches": 2, "num-server-rounds": 2, "eval-every": 0, "global-eval": False,
         "min-nodes": 2, "reply-timeout": 120.0}
SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 96, "max-test-samples": 32,
          "local-steps": 2, "num-server-rounds": 1, "eval-every": 0, "min-nodes": 2, "reply-timeout": 60.0,
          "security": "secure", "label-protection": "client", "global-eval": False}


def _train_then_predict(base: dict, tmp_path: Path, secure: bool) -> tuple[EvalReport, EvalReport, dict]:
    config = {**base, "state-dir": str(tmp_path / "cloud"), "session": "s1"}
    nodes = {"state-dir": str(tmp_path / "nodes")}
    grid = LocalGrid(make_client_app(config), 2, node_config=nodes, dealer=tmp_path / "keys" if secure else None)
    reports: list = []
    run_cloud(grid, config, reports.append)
    trained = [r for r in reports if isinstance(r, EvalReport)][-1]
    run_config, settings = settings_from_run_config(config)
    names = run_labels(run_config, settings)
    truth: dict[str, tuple[list[str], list[str]]] = {}
    later = LocalGrid(make_client_app({**config, "predict": True}), 2, node_config=nodes)
    for node, context in grid.contexts.items():  # every process restarts; tenants get their texts
        node_config = dict(context.node_config)
        if node_config.get("role") != "dealer":
            test = node_rows(run_config, node_source(run_config, settings, node_config)).test
            tenant = f"tenant-{node_config['partition-id']}"
            truth[tenant] = (test.texts, [names[label] for label in test.labels])
            (tmp_path / f"{tenant}.txt").write_text("\n".join(test.texts) + "\n", encoding="utf-8")
            node_config["predict-input"] = str(tmp_path / f"{tenant}.txt")
        later.contexts[node] = Context(run_id=2, node_id=node, node_config=node_config, state=RecordDict(),
                                       run_config={})
    predicted: list = []
    run_cloud(later, {**config, "predict": True}, predicted.append)
    lines = {t: [json.loads(line) for line in (tmp_path / f"{t}.txt.preds.jsonl").read_text().splitlines()]
             for t in truth}
    return trained, predicted[0], {t: (truth[t], lines[t]) for t in truth}


@pytest.mark.parametrize("secure", [False, True])
def test_each_tenant_predicts_its_own_texts_with_its_saved_state(task_identity: None, tmp_path, secure: bool) -> None:
    trained, report, outputs = _train_then_predict(SECURE if secure else PLAIN, tmp_path, secure)
    assert report.scope == "predict" and report.accuracy is None and not report.dropped
    for tenant, ((texts, labels), lines) in outputs.items():
        assert [line["text"] for line in lines] == texts and report.num_examples[tenant] == len(texts)
        assert all(line["label"] == max(line["probabilities"], key=line["probabilities"].get) for line in lines)
        correct = sum(line["label"] == label for line, label in zip(lines, labels))
        slack = 1 if secure else 0  # 2PC truncation may flip a near tie
        assert abs(correct - trained.per_tenant[tenant] * len(texts)) <= slack + 1e-9


def test_predict_without_a_trained_session_is_refused(task_identity: None, tmp_path) -> None:
    config = {**PLAIN, "predict": True, "state-dir": str(tmp_path / "cloud"), "session": "never-trained"}
    with pytest.raises(ConfigError, match="predict: needs the state-dir and session of a trained run"):
        run_cloud(LocalGrid(make_client_app(config), 2), config)


def test_a_node_without_texts_or_state_is_dropped_with_the_reason(task_identity: None, tmp_path) -> None:
    config = {**PLAIN, "state-dir": str(tmp_path / "cloud"), "session": "s1", "num-server-rounds": 1}
    run_cloud(LocalGrid(make_client_app(config), 2, node_config={"state-dir": str(tmp_path / "nodes")}), config)
    (tmp_path / "t.txt").write_text("my card did not arrive\n", encoding="utf-8")
    later = LocalGrid(make_client_app({**config, "predict": True}), 2)  # node 2: no state-dir, node 1: no texts
    later.contexts[1].node_config.update({"state-dir": str(tmp_path / "nodes")})
    later.contexts[2].node_config.update({"predict-input": str(tmp_path / "t.txt")})
    reports: list = []
    run_cloud(later, {**config, "predict": True}, reports.append)
    reasons = reports[0].dropped.values()  # named by node: neither tenant got to reply
    assert any("(tenant-0): this node has no texts to classify" in r for r in reasons)
    assert any("(tenant-1): " in r and "refusing a silent fresh start" in r for r in reasons)
