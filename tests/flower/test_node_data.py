"""Each node's data from its node config: own files (deployment) or a partition (simulations)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Error, Message

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.config import ConfigError
from flower_split.data import DatasetError
from flower_split.flower.fedavg_client_app import fedavg_settings_from_run_config
from flower_split.flower.fedavg_client_app import tenant_data as fedavg_tenant_data
from flower_split.flower.node_data import node_source
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.strategy_utils import EvalReport, RoundReport
from flower_split.flower.tenant import tenant_data
from flower_helpers import LocalGrid

LABELS = ("card_arrival", "exchange_rate", "top_up_failed")
WORDS = {"card_arrival": "when will my new card arrive", "exchange_rate": "what exchange rate do you use",
         "top_up_failed": "my top up did not work"}
TINY = {"model": "tiny", "device": "cpu", "head-rank": 4, "tail-bottleneck": 8, "batch-size": 4,
        "local-steps": 2, "micro-batches": 2, "num-server-rounds": 1, "min-nodes": 2, "reply-timeout": 60.0,
        "labels": ",".join(LABELS), "seed": 0}


def _tenant_csv(directory: Path, name: str, rows: int, offset: int = 0) -> Path:
    path = directory / f"{name}.csv"
    lines = ["text,category"]
    for i in range(rows):
        label = LABELS[(i + offset) % len(LABELS)]
        lines.append(f"{WORDS[label]} {i},{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_node_with_a_data_path_trains_on_its_own_rows_in_both_apps(tmp_path: Path) -> None:
    path = _tenant_csv(tmp_path, "acme", 20)
    node = {"partition-id": 7, "data-path": str(path), "test-fraction": 0.25}
    config, settings = settings_from_run_config(TINY)
    data = tenant_data(config, settings, node)
    assert data.tenant == "tenant-7" and data.num_classes == 3
    assert (len(data.train), len(data.test)) == (15, 5) and data.global_test is data.test
    fedavg_config, fedavg_settings, _ = fedavg_settings_from_run_config(TINY)
    theirs = fedavg_tenant_data(fedavg_config, fedavg_settings, node)
    assert theirs.train.labels == data.train.labels and theirs.test.input_ids == data.test.input_ids


def test_the_label_set_defaults_to_the_tasks_and_partitions_stay_the_default(tmp_path: Path) -> None:
    path = _tenant_csv(tmp_path, "acme", 6)
    config, settings = settings_from_run_config({**TINY, "labels": ""})
    assert len(node_source(config, settings, {"partition-id": 0, "data-path": str(path)}).labels) == 77
    source = node_source(config, settings, {"partition-id": 1, "num-partitions": 3})
    assert (source.files, source.num_partitions) == (None, 3)
    assert tenant_data(config, settings, {"partition-id": 0, "data-path": str(path)}).num_classes == 77


@pytest.mark.parametrize("node, error, message", [
    ({"num-partitions": 2}, ValueError, r"'partition-id' must be a non-negative integer, got None"),
    ({"partition-id": 0}, ValueError, r"'num-partitions' must be a non-negative integer"),
    ({"partition-id": 2, "num-partitions": 2}, ValueError, r"partition-id 2 not in \[0, 2\)"),
    ({"partition-id": 0, "num-partitions": 2, "label-map": "m.json"}, ValueError, r"\['label-map'\] need 'data-path'"),
    ({"partition-id": 0, "data-path": ""}, ValueError, r"'data-path' must name the tenant's data file"),
    ({"partition-id": 0, "data-path": "x.csv", "data-format": "parquet"}, DatasetError, r"data-format: expected one of"),
    ({"partition-id": 0, "data-path": "x.csv", "test-fraction": 1.5}, DatasetError, r"test-fraction: expected a number"),
    ({"partition-id": 0, "data-path": "x.csv", "test-fraction": "most"}, ValueError, r"'test-fraction' must be a number"),
])
def test_bad_node_configs_are_refused_naming_the_key(node: dict, error: type, message: str) -> None:
    config, settings = settings_from_run_config({**TINY, "labels": ""})
    with pytest.raises(error, match=message):
        node_source(config, settings, node)


def test_run_config_labels_are_checked() -> None:
    config, settings = settings_from_run_config({**TINY, "labels": "only-one"})
    with pytest.raises(ConfigError, match="labels: expected at least two distinct"):
        node_source(config, settings, {"partition-id": 0, "data-path": "x.csv"})
    with pytest.raises(ConfigError, match="labels: the label set of tenants' own data"):
        node_source(*settings_from_run_config(TINY), {"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ConfigError, match="results-dir: expected a string"):
        settings_from_run_config({**TINY, "results-dir": 3})


def test_a_missing_file_reaches_the_cloud_as_that_tenants_error(tmp_path: Path, task_identity: None) -> None:
    """Tenants on their own CSVs train a split-plain round; one whose file is missing is dropped, saying why."""
    app = make_client_app(TINY)

    def like_flower(message: Message, context: Context) -> Message:  # an exception becomes an error reply
        try:
            return app(message, context)
        except Exception as exc:  # noqa: BLE001 - as Flower's ClientApp runner does
            return Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=message)

    grid = LocalGrid(like_flower, 3)
    for node, name in ((1, "acme"), (2, "globex")):
        grid.contexts[node].node_config = {"partition-id": node - 1,
                                           "data-path": str(_tenant_csv(tmp_path, name, 16, node))}
    grid.contexts[3].node_config = {"partition-id": 2, "data-path": str(tmp_path / "lost.csv")}
    reports: list[RoundReport | EvalReport] = []
    run_cloud(grid, TINY, reports.append)
    train = reports[0]
    assert isinstance(train, RoundReport) and sorted(train.tenants) == ["tenant-0", "tenant-1"]
    dropped = " ".join(train.dropped.values())
    assert "lost.csv: file not found" in dropped and "DatasetError" in dropped
    assert isinstance(reports[1], EvalReport) and sorted(reports[1].per_tenant) == ["tenant-0", "tenant-1"]
