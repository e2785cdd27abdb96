"""A tenant's own data files: what a deployed SuperNode trains and tests on.

In a deployment every tenant names its own rows in its node config (``data-path``, see
:mod:`flower_split.flower.node_data`); the run config names only the task's label set. The
rows never leave the tenant's machine and never travel in the Flower app bundle.

``path`` is a file or a directory:

- a file (``.csv`` or ``.tsv``): the tenant's rows; a seeded ``test_fraction`` of them is held
  out as its test split;
- a directory: ``train.<ext>`` and, if present, ``test.<ext>`` (else the held-out split of
  ``train.<ext>``), ``<ext>`` being the format's (``csv`` or ``tsv``).

Format (``csv``: comma-separated, ``tsv``: tab-separated; default: the file's suffix, for a
directory the suffix of the ``train.*`` file it holds): a header row naming a text column
(``text`` or ``sentence``) and a label column (``label`` or ``category``), so Banking77's CSVs
and SST-2's TSVs are read as they are. A label is a name of the label set, or, through the
optional ``label_map`` (a JSON object ``{"the tenant's value": "a label-set name"}``), mapped
onto one; a label that is neither (nor a row index ``0 … n-1`` of the label set, as SST-2's
``0``/``1``) is a :class:`DatasetError` naming the file, the line and the value.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flower_split.data.datasets import DatasetError, TextDataset

DATA_FORMATS = ("csv", "tsv")
TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "category")


@dataclass(frozen=True)
class TenantFiles:
    """Where a tenant's rows are and how to read them (hashable: a cache key)."""

    path: str
    data_format: str | None = None  # None: from the file suffix
    label_map: str | None = None  # a JSON file {value: label name}
    test_fraction: float = 0.2

    def validate(self) -> "TenantFiles":
        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            raise DatasetError(f"data-format: expected one of {DATA_FORMATS}, got {self.data_format!r}")
        fraction = self.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise DatasetError(f"test-fraction: expected a number in (0, 1), got {fraction!r}")
        return self


def load_tenant_files(spec: TenantFiles, label_names: list[str], seed: int) -> tuple[TextDataset, TextDataset]:
    """``(train, test)`` of one tenant, labelled with indices into ``label_names``."""
    spec.validate()
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DatasetError(f"data-path: {path}: file not found")
    mapping = _read_label_map(Path(spec.label_map).expanduser(), label_names) if spec.label_map else {}
    index = {name: i for i, name in enumerate(label_names)}
    if path.is_dir():
        train_file, test_file = _directory_files(path, spec.data_format)
    else:
        train_file, test_file = path, None
    data_format = spec.data_format or _format_of(train_file)
    train = _read_rows(train_file, data_format, index, mapping, label_names)
    if test_file is not None:
        return train, _read_rows(test_file, data_format, index, mapping, label_names)
    return _hold_out(train, spec.test_fraction, seed, train_file)


def _directory_files(directory: Path, data_format: str | None) -> tuple[Path, Path | None]:
    formats = (data_format,) if data_format else DATA_FORMATS
    for ext in formats:
        train = directory / f"train.{ext}"
        if train.is_file():
            test = directory / f"test.{ext}"
            return train, test if test.is_file() else None
    wanted = " or ".join(f"train.{ext}" for ext in formats)
    raise DatasetError(f"data-path: {directory}: a directory must hold {wanted} (file not found)")


def _format_of(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext not in DATA_FORMATS:
        raise DatasetError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                           f"set node config data-format to one of {DATA_FORMATS}")
    return ext


def _read_label_map(path: Path, label_names: list[str]) -> dict[str, str]:
    if not path.is_file():
        raise DatasetError(f"label-map: {path}: file not found")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"label-map: {path}: expected a JSON object {{value: label name}} ({exc})") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DatasetError(f"label-map: {path}: expected a JSON object of strings {{value: label name}}")
    unknown = sorted({v for v in mapping.values() if v not in label_names})
    if unknown:
        raise DatasetError(f"label-map: {path}: maps onto {unknown[:5]}, not in the run's label set "
                           f"({len(label_names)} labels: {label_names[:5]}...)")
    return {str(k): v for k, v in mapping.items()}


def _columns(path: Path, header: list[str] | None) -> tuple[str, str]:
    fields = header or []
    text = next((c for c in TEXT_COLUMNS if c in fields), None)
    label = next((c for c in LABEL_COLUMNS if c in fields), None)
    if text is None or label is None:
        raise DatasetError(f"{path}: expected a header with a text column ({' or '.join(TEXT_COLUMNS)}) and a "
                           f"label column ({' or '.join(LABEL_COLUMNS)}), got {header}")
    return text, label


def _read_rows(path: Path, data_format: str, index: dict[str, int], mapping: dict[str, str],
               label_names: list[str]) -> TextDataset:
    texts: list[str] = []
    labels: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            delimiter = "," if data_format == "csv" else "\t"
            reader = csv.DictReader(handle, delimiter=delimiter)
            text_column, label_column = _columns(path, reader.fieldnames)
            for row in reader:
                text, value = row.get(text_column), row.get(label_column)
                if text is None or value is None or None in row:
                    raise DatasetError(f"{path}, line {reader.line_num}: expected {len(reader.fieldnames)} "
                                       f"{data_format} fields, got a malformed row")
                texts.append(text)
                labels.append(_label(value, index, mapping, label_names, f"{path}, line {reader.line_num}"))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable UTF-8 {data_format} file ({exc})") from exc
    if not texts:
        raise DatasetError(f"{path}: no rows")
    return TextDataset(texts, labels, list(label_names))


def _label(value: str, index: dict[str, int], mapping: dict[str, str], label_names: list[str], where: str) -> int:
    name = mapping.get(value, value)
    if name in index:
        return index[name]
    if value.isdigit() and int(value) < len(label_names):
        return int(value)
    raise DatasetError(f"{where}: label {value!r} is not in the run's label set ({len(label_names)} labels: "
                       f"{label_names[:5]}...); map it with node config label-map")


def _hold_out(rows: TextDataset, fraction: float, seed: int, path: Path) -> tuple[TextDataset, TextDataset]:
    if len(rows) < 2:
        raise DatasetError(f"{path}: {len(rows)} row; a file needs at least 2 rows to hold out a test split")
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    count = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    return rows.subset(sorted(order[count:])), rows.subset(sorted(order[:count]))
