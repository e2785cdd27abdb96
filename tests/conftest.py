"""Shared fixtures: tiny local models of several architectures, saved as HF directories."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import (
    AutoTokenizer, BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel,
)

from flwr.supercore.task_identity import TaskIdentity

from flower_split.data import TokenizedDataset, load_dataset
from flower_split.he import ClientKeys, CloudKeys
from flower_split.model import load_tokenizer, minilm_path

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=130)


def _save(model: torch.nn.Module, directory: Path) -> str:
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Random tiny BERT, RoBERTa and DistilBERT models saved to local directories."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    vocab = 30522
    return {
        "bert": _save(BertModel(BertConfig(vocab_size=vocab, **SMALL)), root / "bert"),
        "roberta": _save(RobertaModel(RobertaConfig(vocab_size=vocab, pad_token_id=0, **SMALL)),
                         root / "roberta"),
        "distilbert": _save(DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2,
                                                             hidden_dim=64, max_position_embeddings=130)),
                            root / "distilbert"),
    }


@pytest.fixture(scope="session")
def small_banking(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Banking77 restricted to 4 lexically distinct intents (Banking77 layout), so that the tiny
    random model learns visibly within a couple of federated rounds."""
    import csv
    import json

    from flower_split.data.datasets import PACKAGED_BANKING77

    keep = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed"]
    directory = tmp_path_factory.mktemp("banking4")
    (directory / "categories.json").write_text(json.dumps(keep))
    for name in ("train.csv", "test.csv"):
        with (PACKAGED_BANKING77 / name).open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.DictReader(handle) if row["category"] in keep]
        with (directory / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["text", "category"])
            writer.writeheader()
            writer.writerows(rows)
    return str(directory)


@pytest.fixture(scope="module")
def keys() -> ClientKeys:
    """A tenant's CKKS keys (secret key included), one set per test module."""
    return ClientKeys.generate()


@pytest.fixture(scope="module")
def cloud(keys: ClientKeys) -> CloudKeys:
    """The cloud's public-only copy of ``keys``."""
    return CloudKeys.from_bytes(keys.public_bytes())


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a Flower runtime, ``Message(...)`` needs a run id; set a dummy one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls are ~10x slower with 2 contending torch threads on a loaded 2-core VM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def secure_data() -> TokenizedDataset:
    """24 Banking77 rows spread over the label-sorted file (several classes), tiny tokenizer."""
    train, _ = load_dataset("banking77")
    rows = list(range(0, 8000, 250))[:24]
    return TokenizedDataset(train.subset(rows), load_tokenizer("tiny"), 24)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short private directory (0700) for Unix sockets, whose paths are limited to ~107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="fsw-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
