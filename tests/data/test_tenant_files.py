"""A tenant's own data files (node config ``data-path``): formats, label sets, errors; the FAB carries no data."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flower_split.data.datasets import DatasetError, dataset_labels
from flower_split.data.tenant_files import TenantFiles, load_tenant_files

LABELS = ["card_arrival", "exchange_rate", "top_up_failed"]
ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _csv(rows: int = 10) -> str:
    lines = ["text,category"] + [f"message number {i},{LABELS[i % 3]}" for i in range(rows)]
    return "\n".join(lines) + "\n"


def test_a_single_csv_file_is_split_into_train_and_held_out_test(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", _csv(10))
    train, test = load_tenant_files(TenantFiles(str(path), test_fraction=0.3), LABELS, seed=0)
    assert (len(train), len(test)) == (7, 3)
    assert sorted(train.texts + test.texts) == sorted(f"message number {i}" for i in range(10))
    assert train.label_names == LABELS and set(train.labels) <= {0, 1, 2}
    again = load_tenant_files(TenantFiles(str(path), test_fraction=0.3), LABELS, seed=0)
    assert again[1].texts == test.texts  # the hold-out is seeded


def test_a_directory_with_train_and_test_files(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\nfine\tpositive\n")
    _write(tmp_path / "test.tsv", "sentence\tlabel\nawful\t0\n")
    train, test = load_tenant_files(TenantFiles(str(tmp_path)), ["negative", "positive"], seed=0)
    assert train.labels == [1, 0, 1] and test.texts == ["awful"] and test.labels == [0]


def test_a_label_map_renames_the_tenants_own_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", "text,label\nwhere is my card,CARD\nrate?,FX\nfailed top-up,TOPUP\n")
    mapping = _write(tmp_path / "map.json", json.dumps({"CARD": "card_arrival", "FX": "exchange_rate",
                                                        "TOPUP": "top_up_failed"}))
    train, test = load_tenant_files(TenantFiles(str(path), label_map=str(mapping), test_fraction=0.34), LABELS, 1)
    assert sorted(train.labels + test.labels) == [0, 1, 2]


@pytest.mark.parametrize("content, data_format, message", [
    ("text,category\nhello,not_a_label\n", None, r"line 2: label 'not_a_label' is not in the run's label set"),
    ("text,category\nhello,7\n", None, r"label '7' is not in the run's label set"),
    ("words;intent\nhello;card_arrival\n", None, r"expected a header with a text column"),
    ("text,category\n", None, r"no rows"),
    ("text,category\nhello,card_arrival,extra\n", None, r"line 2: expected 2 csv fields"),
    ("text,category\nhello,card_arrival\n", "xls", r"data-format: expected one of \('csv', 'tsv'\), got 'xls'"),
])
def test_bad_files_are_refused_naming_the_file_and_the_problem(tmp_path: Path, content: str, data_format: str | None,
                                                               message: str) -> None:
    path = _write(tmp_path / "mine.csv", content)
    with pytest.raises(DatasetError, match=message):
        load_tenant_files(TenantFiles(str(path), data_format=data_format), LABELS, 0)


def test_missing_files_and_unknown_suffixes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data-path: .*nowhere.csv: file not found"):
        load_tenant_files(TenantFiles(str(tmp_path / "nowhere.csv")), LABELS, 0)
    with pytest.raises(DatasetError, match=r"must hold train.csv or train.tsv \(file not found\)"):
        load_tenant_files(TenantFiles(str(tmp_path)), LABELS, 0)
    path = _write(tmp_path / "mine.txt", _csv(4))
    with pytest.raises(DatasetError, match=r"cannot tell the format from the suffix '.txt'"):
        load_tenant_files(TenantFiles(str(path)), LABELS, 0)
    assert len(load_tenant_files(TenantFiles(str(path), data_format="csv"), LABELS, 0)[0]) == 3
    with pytest.raises(DatasetError, match=r"label-map: .*absent.json: file not found"):
        load_tenant_files(TenantFiles(str(path), data_format="csv", label_map=str(tmp_path / "absent.json")),
                          LABELS, 0)
    bad_map = _write(tmp_path / "map.json", json.dumps({"x": "no_such_intent"}))
    with pytest.raises(DatasetError, match=r"maps onto \['no_such_intent'\], not in the run's label set"):
        load_tenant_files(TenantFiles(str(path), data_format="csv", label_map=str(bad_map)), LABELS, 0)


def test_the_label_set_of_a_task_reads_no_rows() -> None:
    assert len(dataset_labels("banking77")) == 77
    assert dataset_labels("sst2") == ["negative", "positive"]
    with pytest.raises(DatasetError, match="is not 'banking77', 'sst2'"):
        dataset_labels("/no/such/dir")


def test_the_fab_carries_no_data_and_banking77_never_comes_from_the_app_directory(tmp_path: Path) -> None:
    """Deployment imports ``flower_split`` from the FAB (first on ``sys.path``); Banking77 still loads."""
    from flwr.cli.build import build_fab_from_disk

    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT)))
    names = fab.namelist()
    assert "flower_split/apps/client_app.py" in names
    assert not [n for n in names if not n.endswith(".py") and n not in ("pyproject.toml", ".info/CONTENT")]
    assert not [n for n in names if n.startswith(("flower_split_assets/", "tests/"))]
    app_dir = tmp_path / "app"
    fab.extractall(app_dir)
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "import flower_split\nfrom flower_split.data.datasets import PACKAGED_BANKING77, load_dataset\n"
              "assert flower_split.__file__.startswith(sys.argv[1]), flower_split.__file__\n"
              "assert not str(PACKAGED_BANKING77).startswith(sys.argv[1]), PACKAGED_BANKING77\n"
              "train, test = load_dataset('banking77')\nprint(len(train), len(test))\n")
    done = subprocess.run([sys.executable, "-c", script, str(app_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10003", "3080"]
