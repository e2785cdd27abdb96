"""What each tenant trains and tests on, shared by every federated app (split, FedAvg-LoRA).

All apps of one comparison must see the same rows: the same subset of the data set
(``max_train_samples`` / ``max_test_samples`` drawn with ``seed`` / ``seed + 1``, exactly as
:func:`flower_split.api.train` draws them for the centralized baseline), the same partition
(:func:`partition_indices` with the same spec and seed), and the same per-tenant test split
(:func:`split_test_like_train`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flower_split.config import RunConfig
from flower_split.data.datasets import TextDataset, load_dataset
from flower_split.data.partition import partition_indices


def sample_rows(size: int, count: int | None, seed: int) -> list[int]:
    """A fixed random subset of ``count`` of ``size`` rows (all rows if ``count`` is None or larger)."""
    if count is None or count >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


def split_test_like_train(partitions: list[list[int]], train_labels: list[int], test_labels: list[int],
                          seed: int) -> list[list[int]]:
    """Disjoint test rows per tenant, with the label distribution of each tenant's training rows.

    The test rows of each class are shuffled (``seed``) and dealt out to the tenants in
    proportion to how many training rows of that class each holds (largest remainder), so
    tenant ``k`` tests on the classes it trains on, in the same proportions. Classes no tenant
    trains on are left out.
    """
    num_classes = max([*train_labels, *test_labels], default=-1) + 1
    counts = np.zeros((len(partitions), num_classes), dtype=np.int64)
    for k, rows in enumerate(partitions):
        np.add.at(counts[k], np.asarray([train_labels[i] for i in rows], dtype=np.int64), 1)
    rng = np.random.default_rng(seed)
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for row, label in enumerate(test_labels):
        by_class[label].append(row)
    result: list[list[int]] = [[] for _ in partitions]
    for c, rows in enumerate(by_class):
        total = int(counts[:, c].sum())
        if total == 0 or not rows:
            continue
        rows = [rows[i] for i in rng.permutation(len(rows))]
        exact = counts[:, c] * len(rows) / total
        quota = np.floor(exact).astype(np.int64)
        for k in np.argsort(-(exact - quota), kind="stable")[: len(rows) - int(quota.sum())]:
            quota[k] += 1
        start = 0
        for k, n in enumerate(quota.tolist()):
            result[k].extend(rows[start : start + n])
            start += n
    return [sorted(rows) for rows in result]


@dataclass(frozen=True)
class TenantSplits:
    """The sampled global train/test sets and every tenant's rows in them."""

    train: TextDataset
    test: TextDataset
    train_rows: list[list[int]]
    test_rows: list[list[int]]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def tenant_train(self, partition_id: int) -> TextDataset:
        return self.train.subset(self.train_rows[partition_id])

    def tenant_test(self, partition_id: int) -> TextDataset:
        return self.test.subset(self.test_rows[partition_id])


def global_test_set(config: RunConfig) -> TextDataset:
    """The sampled test set (the centralized baseline's; every tenant's test split is drawn from it)."""
    _, test = load_dataset(config.dataset, config.data_dir)
    return test.subset(sample_rows(len(test), config.max_test_samples, config.seed + 1))


def tenant_splits(config: RunConfig, partition: str, num_partitions: int) -> TenantSplits:
    """Subsets, partitions and per-tenant test splits for ``config`` (deterministic in ``seed``)."""
    train, test = load_dataset(config.dataset, config.data_dir)
    train = train.subset(sample_rows(len(train), config.max_train_samples, config.seed))
    test = test.subset(sample_rows(len(test), config.max_test_samples, config.seed + 1))
    partitions = partition_indices(train.labels, partition, num_partitions, config.seed)
    tests = split_test_like_train(partitions, train.labels, test.labels, config.seed)
    return TenantSplits(train, test, partitions, tests)
