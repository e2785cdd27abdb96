"""Labeled text-classification data sets, read from local files only.

Banking77 ships with the package (CC BY 4.0, license file alongside), in the data-only
package ``flower_split_assets``, read through :mod:`importlib.resources` and never through a
Flower app directory (a FAB carries no data; ``flower_split_assets/__init__.py`` says why);
SST-2 and any other directory with the same file layout are read from a path. A missing or
malformed file raises :class:`DatasetError` naming the file and what was expected.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

PACKAGED_BANKING77: Traversable = files("flower_split_assets") / "banking77"
SST2_LABELS = ("negative", "positive")
DEFAULT_SST2_DIRS = (Path("../shared/data/sst2"), Path("../../shared/data/sst2"))


class DatasetError(ValueError):
    """A data file is missing or not in the expected format."""


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels in ``range(len(label_names))``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, indices: list[int]) -> "TextDataset":
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                           self.label_names)


def load_dataset(name: str, data_dir: str | None = None) -> tuple[TextDataset, TextDataset]:
    """(train, test) for ``banking77``, ``sst2`` or a directory holding either layout."""
    if name == "banking77":
        return load_banking77(Path(data_dir) if data_dir else PACKAGED_BANKING77)
    if name == "sst2":
        return load_sst2(Path(data_dir) if data_dir else _find_sst2())
    path = Path(name)
    if (path / "categories.json").exists():
        return load_banking77(path)
    if (path / "train.tsv").exists():
        return load_sst2(path)
    raise _unknown_dataset(name)


def dataset_labels(name: str, data_dir: str | None = None) -> list[str]:
    """The label names of ``name`` (what :func:`load_dataset` would label with), reading no rows.

    The label set of a task whose rows stay with the tenants (node config ``data-path``).
    """
    if name == "sst2" or (name != "banking77" and (Path(name) / "train.tsv").exists()):
        return list(SST2_LABELS)
    if name == "banking77":
        return _read_categories((Path(data_dir) if data_dir else PACKAGED_BANKING77) / "categories.json")
    if (Path(name) / "categories.json").exists():
        return _read_categories(Path(name) / "categories.json")
    raise _unknown_dataset(name)


def _unknown_dataset(name: str) -> DatasetError:
    return DatasetError(
        f"dataset: {name!r} is not 'banking77', 'sst2', or a directory containing "
        "categories.json+train.csv+test.csv (Banking77 layout) or train.tsv+dev.tsv (SST-2 layout)"
    )


def load_banking77(directory: Path | Traversable) -> tuple[TextDataset, TextDataset]:
    """Banking77 layout: ``categories.json`` (list of names), ``train.csv``/``test.csv`` (text,category)."""
    names = _read_categories(directory / "categories.json")
    index = {name: i for i, name in enumerate(names)}
    return (_read_banking_csv(directory / "train.csv", index, names),
            _read_banking_csv(directory / "test.csv", index, names))


def load_sst2(directory: Path) -> tuple[TextDataset, TextDataset]:
    """SST-2 layout: ``train.tsv`` and ``dev.tsv`` with header ``sentence<TAB>label``; dev is the test set."""
    names = list(SST2_LABELS)
    return _read_sst_tsv(directory / "train.tsv", names), _read_sst_tsv(directory / "dev.tsv", names)


def _find_sst2() -> Path:
    for candidate in DEFAULT_SST2_DIRS:
        if (candidate / "train.tsv").exists():
            return candidate
    raise DatasetError(
        "dataset: sst2 is not shipped with the package; pass --data-dir pointing at a directory "
        f"with train.tsv and dev.tsv (looked in {', '.join(str(p) for p in DEFAULT_SST2_DIRS)})"
    )


def _require(path: Path | Traversable) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")


def _read_categories(path: Path | Traversable) -> list[str]:
    _require(path)
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: expected a JSON list of category names ({exc})") from exc
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path}: expected a non-empty JSON list of category names")
    return names


def _read_banking_csv(path: Path | Traversable, index: dict[str, int], names: list[str]) -> TextDataset:
    _require(path)
    texts: list[str] = []
    labels: list[int] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)  # some texts are quoted and span lines
        if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected a CSV header 'text,category', got {reader.fieldnames}")
        for row in reader:
            category = row["category"]
            if category not in index:
                raise DatasetError(
                    f"{path}, line {reader.line_num}: category {category!r} is not in categories.json"
                )
            texts.append(row["text"])
            labels.append(index[category])
    if not texts:
        raise DatasetError(f"{path}: no rows")
    return TextDataset(texts, labels, names)


def _read_sst_tsv(path: Path, names: list[str]) -> TextDataset:
    _require(path)
    texts: list[str] = []
    labels: list[int] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != ["sentence", "label"]:
            raise DatasetError(f"{path}: expected a TSV header 'sentence<TAB>label', got {header}")
        for row in reader:
            if len(row) != 2 or row[1] not in ("0", "1"):
                raise DatasetError(f"{path}, line {reader.line_num}: expected 'sentence<TAB>0|1', got {row}")
            texts.append(row[0])
            labels.append(int(row[1]))
    if not texts:
        raise DatasetError(f"{path}: no rows")
    return TextDataset(texts, labels, names)
