"""FedAvg-LoRA baseline: same rows as the split apps, message validation, and a Ray simulation.

The last test runs ``flower-split simulate --strategy fedavg`` (Flower's FedAvg under
``run_simulation``, Ray backend) with two tenants on the tiny model and a 4-intent Banking77
subset, and checks that the global model learns and that the costs are reported.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flower_split.cli import main
from flower_split.flower.tenant import tenant_data as split_tenant_data
from flower_split.flower.fedavg_client_app import (
    fedavg_settings_from_run_config, make_fedavg_client_app, model_for, tenant_data, trainable_state,
)
from flower_split.config import ConfigError
from flower_split.flower.metering import record_bytes

RUN_KEYS = {"name", "mode", "security", "dataset", "model", "test_accuracy", "test_macro_f1",
            "train_loss_history", "wall_seconds", "client_cpu_seconds", "bytes_client_to_cloud",
            "bytes_cloud_to_client", "config"}


def _values(dataset: str, **extra: object) -> dict:
    return {"model": "tiny", "dataset": dataset, "device": "cpu", "max-train-samples": 320,
            "max-test-samples": 120, "lr": 0.01, "batch-size": 32, "num-server-rounds": 2,
            "partition": "iid", "min-nodes": 2, "reply-timeout": 300.0, **extra}


def test_fedavg_tenants_see_exactly_the_split_apps_rows(small_banking: str) -> None:
    values = _values(small_banking, partition="dirichlet:0.5")
    config, settings, _ = fedavg_settings_from_run_config({**values, "local-epochs": 2})
    for partition_id in range(3):
        node = {"partition-id": partition_id, "num-partitions": 3}
        ours, theirs = tenant_data(config, settings, node), split_tenant_data(config, settings, node)
        assert ours.train.labels == theirs.train.labels and ours.train.input_ids == theirs.train.input_ids
        assert ours.test.labels == theirs.test.labels and ours.test.input_ids == theirs.test.input_ids
    sizes = [len(tenant_data(config, settings, {"partition-id": k, "num-partitions": 3}).train) for k in range(3)]
    assert sum(sizes) == 320 and len(set(sizes)) > 1  # Dirichlet: unequal partitions covering all rows


def test_fedavg_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="^local-epochs: expected a positive integer"):
        fedavg_settings_from_run_config({"model": "tiny", "local-epochs": 0})
    with pytest.raises(ConfigError, match="lr: expected a positive number"):
        fedavg_settings_from_run_config({"model": "tiny", "lr": -1.0})


def test_fedavg_client_trains_its_partition_and_rejects_malformed_messages(
        small_banking: str, task_identity: None) -> None:
    values = _values(small_banking)
    config, settings, _ = fedavg_settings_from_run_config(values)
    app = make_fedavg_client_app(values)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    initial = {k: v.clone() for k, v in trainable_state(model_for(config, 4)).items()}
    arrays = ArrayRecord(torch_state_dict=initial)

    reply = app(Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"local-epochs": 1, "server-round": 1})}),
                        1, "train"), context)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 160 and metrics["steps"] == 5 and metrics["partition-id"] == 1
    trained = reply.content["arrays"].to_torch_state_dict()
    assert trained.keys() == initial.keys()
    assert any("lora_A" in k for k in trained) and "classifier.weight" in trained
    assert not all(torch.equal(trained[k], initial[k]) for k in initial)  # it trained
    assert record_bytes(reply.content) == record_bytes(RecordDict({"arrays": arrays}))

    reply = app(Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        1, "evaluate"), context)
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] > 0

    bad_shape = ArrayRecord(torch_state_dict={**initial, "classifier.weight": torch.zeros(3, 3)})
    for content, reason in [
        (RecordDict({"config": ConfigRecord({"local-epochs": 1})}), "expected records 'arrays' and 'config'"),
        (RecordDict({"arrays": arrays, "config": ConfigRecord({"local-epochs": 0, "server-round": 1})}),
         "config.local-epochs: expected an integer >= 1"),
        (RecordDict({"arrays": bad_shape, "config": ConfigRecord({"local-epochs": 1, "server-round": 1})}),
         "arrays.classifier.weight: expected torch.float32[4, 32]"),
        (RecordDict({"arrays": ArrayRecord({"x": Array(torch.zeros(1).numpy())}),
                     "config": ConfigRecord({"local-epochs": 1, "server-round": 1})}), "unexpected ['x']"),
    ]:
        reply = app(Message(content, 1, "train"), context)
        assert reply.has_error() and reason in reply.error.reason
        assert reply.error.reason.startswith("FedAvgMessageError (tenant-1)")


def test_simulate_cli_rejects_bad_values_before_starting(capsys: pytest.CaptureFixture, tmp_path) -> None:
    argv = ["simulate", "--strategy", "fedavg", "--num-clients", "2", "--partition", "iid", "--out", str(tmp_path)]
    assert main([*argv, "--rounds", "0"]) == 2
    assert "num-server-rounds" in capsys.readouterr().err
    assert main([*argv, "--rounds", "1", "--set", "local_epochs=0"]) == 2
    assert "local-epochs" in capsys.readouterr().err
    assert main([*argv, "--rounds", "1", "--partition", "dirichlet:x"]) == 2
    assert "partition" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_fedavg_simulation_two_tenants_learns(small_banking: str, capsys: pytest.CaptureFixture, tmp_path) -> None:
    # dirichlet:100 is close to IID. ("iid" would not do: flwr-datasets' IidPartitioner takes
    # contiguous shards, and Banking77's rows are grouped by intent, so each tenant would get
    # mostly different intents.)
    argv = ["simulate", "--strategy", "fedavg", "--num-clients", "2", "--rounds", "2", "--partition",
            "dirichlet:100", "--out", str(tmp_path), "--cpus", "1"]
    for key, value in {"model": "tiny", "dataset": small_banking, "device": "cpu", "max_train_samples": 320,
                       "max_test_samples": 120, "lr": 0.01, "local_epochs": 2, "eval_initial": True}.items():
        argv += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    assert main(argv) == 0
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[fedavg-lora] round")]
    assert [line.split()[2].rstrip(",") for line in progress] == ["0/2", "1/2", "2/2"]  # a line per round

    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert RUN_KEYS <= set(run) and run["name"] == "fedavg-lora" and run["mode"] == "federated"
    rounds = run["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # the global model learns: well above its initial (chance-level) accuracy, loss going down
    assert rounds[2]["global_test_accuracy"] > rounds[0]["global_test_accuracy"] + 0.15
    assert rounds[2]["train_loss"] < rounds[1]["train_loss"]
    assert run["global_test_accuracy"] == rounds[2]["global_test_accuracy"] > 0.4
    assert sorted(run["per_tenant_accuracy"]) == ["tenant-0", "tenant-1"]
    counts = run["per_tenant_test_examples"]
    assert sum(counts.values()) == 120
    weighted = sum(run["per_tenant_accuracy"][t] * n for t, n in counts.items()) / 120
    assert run["test_accuracy"] == pytest.approx(weighted) == pytest.approx(rounds[2]["test_accuracy"])
    # costs: trainable arrays down and up once per round; CPU and memory measured in the clients
    sizes = {r["bytes_down"] for r in rounds[1:]} | {r["bytes_up"] for r in rounds[1:]}
    assert len(sizes) == 1 and sizes.pop() > 10_000
    assert all(r["round_trips"] == 1 for r in rounds[1:])
    assert [c["tenant"] for c in run["clients"]] == ["tenant-0", "tenant-1"]
    for client in run["clients"]:
        assert client["train_cpu_seconds"] > 0 and client["eval_cpu_seconds"] > 0
        assert client["setup_cpu_seconds"] > 0 and client["peak_rss_bytes"] > 100 * 2**20
        assert client["bytes_down"] == 2 * 2 * rounds[1]["bytes_down"]  # train + evaluate, 2 rounds
    assert run["train_examples_processed"] == 2 * 2 * 320  # rounds x local epochs x rows
    assert run["client_cpu_seconds_per_sample"] > 0 and 0 < run["round_trips_per_step"] < 1
