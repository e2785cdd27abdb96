"""Data loading, clear errors on bad files, deterministic tenant partitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from flower_split.config import ConfigError
from flower_split.data import DatasetError, TokenizedDataset, load_dataset, partition_indices
from flower_split.data.datasets import PACKAGED_BANKING77
from flower_split.model import load_tokenizer

SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"


def test_banking77_ships_with_its_license() -> None:
    train, test = load_dataset("banking77")
    assert (len(train), len(test), train.num_classes) == (10003, 3080, 77)
    assert set(train.labels) == set(range(77))
    assert (PACKAGED_BANKING77 / "LICENSE").read_text().startswith("Attribution 4.0 International")


@pytest.mark.skipif(not SST2.exists(), reason="shared SST-2 copy not present")
def test_sst2_from_directory() -> None:
    train, test = load_dataset("sst2", str(SST2))
    assert (len(train), len(test), train.num_classes) == (60614, 6735, 2)


def test_missing_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "categories.json").write_text('["a", "b"]')
    with pytest.raises(DatasetError, match="train.csv: file not found"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("content, message", [
    ("words,label\nhi,a\n", "expected a CSV header 'text,category'"),
    ("text,category\nhi,zzz\n", "category 'zzz' is not in categories.json"),
])
def test_malformed_csv_is_explained(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "categories.json").write_text('["a", "b"]')
    (tmp_path / "train.csv").write_text(content)
    (tmp_path / "test.csv").write_text("text,category\nhi,a\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(tmp_path))


def test_malformed_categories(tmp_path: Path) -> None:
    (tmp_path / "categories.json").write_text("{not json")
    with pytest.raises(DatasetError, match="categories.json: expected a JSON list"):
        load_dataset(str(tmp_path))


def test_unknown_dataset_name() -> None:
    with pytest.raises(DatasetError, match="dataset: 'nope'"):
        load_dataset("nope")


def test_dynamic_padding() -> None:
    train, _ = load_dataset("banking77")
    data = TokenizedDataset(train.subset([0, 1, 2]), load_tokenizer("tiny"), max_length=64)
    batch = data.collate([0, 1])
    width = max(len(data.input_ids[0]), len(data.input_ids[1]))
    assert batch.input_ids.shape == (2, width)
    assert batch.attention_mask.sum().item() == len(data.input_ids[0]) + len(data.input_ids[1])


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.1"])
def test_partitions_disjoint_cover_and_deterministic(spec: str) -> None:
    labels = load_dataset("banking77")[0].labels
    parts = partition_indices(labels, spec, num_partitions=10, seed=3)
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat)) == len(labels)
    assert parts == partition_indices(labels, spec, num_partitions=10, seed=3)
    assert parts != partition_indices(labels, spec, num_partitions=10, seed=4) or spec == "iid"


def test_iid_is_iid_even_on_label_sorted_files() -> None:
    labels = sorted(load_dataset("banking77")[0].labels)  # worst case: grouped by label
    parts = partition_indices(labels, "iid", num_partitions=5, seed=0)
    assert all(len({labels[i] for i in part}) == 77 for part in parts)


def test_dirichlet_is_non_iid() -> None:
    labels = load_dataset("banking77")[0].labels
    parts = partition_indices(labels, "dirichlet:0.1", num_partitions=10, seed=0)
    classes_per_tenant = [len({labels[i] for i in part}) for part in parts]
    assert min(classes_per_tenant) < 77


def test_shards_are_disjoint() -> None:
    labels = load_dataset("banking77")[0].labels
    parts = partition_indices(labels, "shards:2", num_partitions=10, seed=0)
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("spec", ["dirichlet", "dirichlet:-1", "dirichlet:x", "bogus", "shards:0"])
def test_bad_partition_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="partition"):
        partition_indices([0, 1, 0, 1], spec, 2, 0)
