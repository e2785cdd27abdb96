"""Which rows a node trains and tests on, from its node config: shared by the split and FedAvg apps.

Two ways, chosen per node by its ``context.node_config``:

- **its own files** (deployment): ``data-path`` (a ``.csv`` / ``.tsv`` file or a directory
  with ``train.csv`` and optionally ``test.csv``), optional ``data-format`` (``csv`` /
  ``tsv``; default: the suffix), ``label-map`` (a JSON file mapping the tenant's label values
  onto the run's label set) and ``test-fraction`` (held out of a single file, default 0.2);
  see :mod:`flower_split.data.tenant_files`. The run config names only the task: its label
  set is that of ``dataset`` (``banking77``'s 77 categories, SST-2's two), or the
  comma-separated names of run-config ``labels``. ``partition-id`` still names the tenant
  (``tenant-<partition-id>``, unique per federation); ``num-partitions`` is not used. Every
  tenant's "global" evaluation is on its own test split (there is no shared test set).
- **a partition of the run's data set** (the default; simulations): ``partition-id`` of
  ``num-partitions`` (:func:`flower_split.data.tenants.tenant_splits`: the same rows as the
  centralized baseline's, partitioned by run-config ``partition``).

Both apps cache the result per process (:func:`node_rows`); in a deployment every message
runs in a fresh process and reads the files again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

from flower_split.config import ConfigError, RunConfig
from flower_split.data import TextDataset
from flower_split.data.datasets import DatasetError, dataset_labels
from flower_split.data.tenant_files import TenantFiles, load_tenant_files
from flower_split.data.tenants import sample_rows, tenant_splits
from flower_split.flower.settings import FlowerSettings

DATA_PATH, DATA_FORMAT, LABEL_MAP, TEST_FRACTION = "data-path", "data-format", "label-map", "test-fraction"
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
OWN_DATA_KEYS = (DATA_PATH, DATA_FORMAT, LABEL_MAP, TEST_FRACTION)


@dataclass(frozen=True)
class NodeSource:
    """Where a node's rows come from (hashable: the cache key of :func:`node_rows`)."""

    partition_id: int
    num_partitions: int | None = None  # a partition of the run's data set
    partition: str = "iid"
    files: TenantFiles | None = None  # or the node's own files
    labels: tuple[str, ...] | None = None  # the run's label set, own files only


@dataclass(frozen=True)
class NodeRows:
    """One node's training and test rows (untokenized)."""

    partition_id: int
    train: TextDataset
    test: TextDataset
    global_test: TextDataset

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def node_source(config: RunConfig, settings: FlowerSettings, node_config: Mapping[str, Any]) -> NodeSource:
    """Validate a node's data keys; raise a ``ValueError`` that names the key and an example."""
    partition_id = _int_key(node_config, PARTITION_ID)
    if DATA_PATH in node_config:
        return NodeSource(partition_id, files=_files(node_config), labels=run_labels(config, settings))
    stray = [key for key in OWN_DATA_KEYS if key in node_config]
    if stray:
        raise ValueError(f"node_config: {stray} need {DATA_PATH!r} (the tenant's own data file or directory)")
    if settings.labels:
        raise ConfigError("labels: the label set of tenants' own data (node config data-path); "
                          f"a partition of dataset {config.dataset!r} uses that data set's labels")
    num_partitions = _int_key(node_config, NUM_PARTITIONS)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node_config: partition-id {partition_id} not in [0, {num_partitions})")
    if settings.simulated_dealer and "role" not in node_config:
        num_partitions -= 1  # the last partition id is the simulated dealer's node
        if partition_id >= num_partitions:
            raise ValueError(f"node_config: partition-id {partition_id} is the simulated dealer's, not a tenant's")
    return NodeSource(partition_id, num_partitions, settings.partition)


def run_labels(config: RunConfig, settings: FlowerSettings) -> tuple[str, ...]:
    """The run's label set: run-config ``labels`` (comma-separated), else those of ``dataset``."""
    if settings.labels:
        names = tuple(name.strip() for name in settings.labels.split(","))
        if len(names) < 2 or "" in names or len(set(names)) != len(names):
            raise ConfigError(f"labels: expected at least two distinct comma-separated names, got {settings.labels!r}")
        return names
    return tuple(dataset_labels(config.dataset, config.data_dir))


def node_rows(config: RunConfig, source: NodeSource) -> NodeRows:
    """The rows of ``source`` (cached per process)."""
    return _node_rows(tuple(sorted(config.to_dict().items())), source)


@functools.lru_cache(maxsize=32)  # a simulation actor may serve every tenant in turn
def _node_rows(config_items: tuple[tuple[str, Any], ...], source: NodeSource) -> NodeRows:
    config = RunConfig(**dict(config_items))
    if source.files is None:
        splits = _splits(config_items, source.partition, source.num_partitions)
        return NodeRows(source.partition_id, splits.tenant_train(source.partition_id),
                        splits.tenant_test(source.partition_id), splits.test)
    train, test = load_tenant_files(source.files, list(source.labels or ()), config.seed)
    train = train.subset(sample_rows(len(train), config.max_train_samples, config.seed))
    test = test.subset(sample_rows(len(test), config.max_test_samples, config.seed + 1))
    return NodeRows(source.partition_id, train, test, test)


@functools.lru_cache(maxsize=2)
def _splits(config_items: tuple[tuple[str, Any], ...], partition: str, num_partitions: int | None) -> Any:
    return tenant_splits(RunConfig(**dict(config_items)), partition, int(num_partitions or 0))


def _int_key(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(
            f"node_config: {key!r} must be a non-negative integer, got {value!r} (e.g. flower-supernode "
            "--node-config 'partition-id=0 num-partitions=2', or 'partition-id=0 data-path=\"/data/mine.csv\"')"
        )
    return int(value)


def _files(node_config: Mapping[str, Any]) -> TenantFiles:
    def text(key: str) -> str | None:
        value = node_config.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ValueError(f"node_config: {key!r} must be a string, got {value!r}")
        return value

    path = text(DATA_PATH)
    if path is None:
        raise ValueError(f"node_config: {DATA_PATH!r} must name the tenant's data file or directory, got ''")
    fraction = node_config.get(TEST_FRACTION, 0.2)
    try:
        return TenantFiles(path, text(DATA_FORMAT), text(LABEL_MAP), float(fraction)).validate()
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise ValueError(f"node_config: {TEST_FRACTION!r} must be a number in (0, 1), got {fraction!r}") from exc
