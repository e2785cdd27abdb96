"""Split a data set among K tenants with flwr-datasets partitioners, deterministically."""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner

from flower_split.config import ConfigError


def make_partitioner(spec: str, num_partitions: int, seed: int) -> Partitioner:
    """``iid``, ``dirichlet:ALPHA`` (non-IID over labels) or ``shards:N`` (N label shards per tenant)."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        alpha = _number("partition", spec, arg, float)
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    seed=seed, min_partition_size=0, self_balancing=False)
    if kind == "shards":
        shards = _number("partition", spec, arg, int)
        return ShardPartitioner(num_partitions=num_partitions, partition_by="label",
                                num_shards_per_partition=shards, seed=seed)
    raise ConfigError(f"partition: expected 'iid', 'dirichlet:ALPHA' or 'shards:N', got {spec!r}")


def partition_indices(labels: list[int], spec: str, num_partitions: int, seed: int) -> list[list[int]]:
    """Row indices of each tenant's partition; disjoint, and together they cover every row."""
    if num_partitions < 1:
        raise ConfigError(f"num_clients: expected a positive integer, got {num_partitions}")
    partitioner = make_partitioner(spec, num_partitions, seed)
    # Shuffled first: IidPartitioner cuts contiguous shards, and files are often sorted by label.
    rows = Dataset.from_dict({"label": labels, "row": list(range(len(labels)))})
    partitioner.dataset = rows.shuffle(seed=seed)
    return [sorted(partitioner.load_partition(k)["row"]) for k in range(num_partitions)]


def _number(field: str, spec: str, text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{field}: cannot read a number from {spec!r}") from None
    if value <= 0:
        raise ConfigError(f"{field}: the number in {spec!r} must be positive")
    return value
