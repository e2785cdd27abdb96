"""Saved party state on disk: exact round trips, permissions, atomic replacement, strict refusals."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from flower_split.config import RunConfig
from flower_split.data import Batch
from flower_split.model import build_split
from flower_split.protocol import ClientParty
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.dealer_identity import new_identity
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.state import (
    FORMAT_VERSION, META_FILE, StateError, decode, digest, encode, read_party, write_party,
)
from flower_split.transport import SecureLocalTransport

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = RunConfig(model="tiny", security="secure", label_protection="client", batch_size=4, max_length=12,
                   head_rank=4, tail_bottleneck=8, device="cpu")


def _every_kind() -> dict:
    return {"f32": torch.randn(3, 2), "i64": torch.arange(5), "bool": torch.tensor([True, False]),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0), "bytes": b"\x00\x01secret", "nothing": b"",
            "int_keys": {0: {"momentum_buffer": torch.ones(2)}, 7: "x"}, "tuple": (1, "a", None),
            "list": [1.5, True, None, {"nested": b"\xff"}], "text": "tenant-0", "inf": float("inf"),
            "a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}  # two entries spelling the same path


def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (4, 6), generator=g)
    return Batch(ids, torch.ones_like(ids), torch.randint(0, 3, (4,), generator=g), torch.arange(4))


def test_codec_round_trip_keeps_every_value_type(tmp_path: Path) -> None:
    state = _every_kind()
    tree, tensors = encode(state)
    json.dumps(tree)  # the tree is plain JSON
    assert digest(decode(tree, tensors)) == digest(state)
    loaded = read_party(write_party(tmp_path / "p", "tenant", state, {"k": 1}), "tenant")
    assert digest(loaded.state) == digest(state) and loaded.meta == {"k": 1}
    assert loaded.state["int_keys"][0]["momentum_buffer"].tolist() == [1.0, 1.0]
    assert loaded.state["tuple"] == (1, "a", None) and loaded.state["bytes"] == b"\x00\x01secret"
    assert loaded.state["a.b"].item() == 0.0 and loaded.state["a"]["b"].item() == 1.0
    assert digest({**state, "bytes": b"\x00\x01secreT"}) != digest(state)


def test_plain_client_state_round_trips_through_disk(tmp_path: Path) -> None:
    parts = build_split("tiny", 3, 4, 8)
    client = ClientParty("tenant-0", parts.embedder, parts.head, parts.tail, CONFIG, 10)
    client.begin(_batch())  # a step in flight: its batch is part of the state
    saved = read_party(write_party(tmp_path / "t", "tenant", client.state_dict(), {}), "tenant")
    fresh_parts = build_split("tiny", 3, 4, 8, seed=1)
    fresh = ClientParty("tenant-0", fresh_parts.embedder, fresh_parts.head, fresh_parts.tail, CONFIG, 10)
    fresh.load_state_dict(saved.state)
    assert digest(fresh.state_dict()) == digest(client.state_dict())


@pytest.mark.parametrize("protection", ["client", "he"])
def test_secure_party_states_round_trip_through_disk(tmp_path: Path, protection: str) -> None:
    config = RunConfig(**{**CONFIG.to_dict(), "label_protection": protection})
    parts = build_split("tiny", 3, 4, 8)
    identity = new_identity()  # the dealer's key file: a restarted dealer loads its state under it
    dealer = SecureDealerParty(identity)
    cloud = SecureCloudParty(parts.body, dealer.public)
    client = SecureClientParty("tenant-0", parts.embedder, parts.head, parts.tail, config, 10)
    transport = SecureLocalTransport(cloud, dealer)
    transport.connect(client)
    client.pop_result(transport.run_step(client, _batch()))
    for kind, party, fresh in (
            ("dealer", dealer, SecureDealerParty(identity)),
            ("cloud", cloud, SecureCloudParty(parts.body, dealer.public)),
            ("tenant", client, SecureClientParty("tenant-0", parts.embedder, parts.head, parts.tail, config, 10))):
        saved = read_party(write_party(tmp_path / kind, kind, party.state_dict(), {}), kind)
        fresh.load_state_dict(saved.state)
        assert digest(fresh.state_dict()) == digest(party.state_dict()), kind


def test_files_are_private_and_a_save_replaces_atomically(tmp_path: Path) -> None:
    directory = tmp_path / "cloud"
    write_party(directory, "cloud", {"w": torch.zeros(3)}, {})
    write_party(directory, "cloud", {"w": torch.ones(3)}, {})
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) == 2 and META_FILE in files, files  # the old tensor file is gone, no temp file left
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert read_party(directory, "cloud").state["w"].tolist() == [1.0, 1.0, 1.0]


def _saved(tmp_path: Path) -> Path:
    return write_party(tmp_path / "tenant", "tenant", {"w": torch.arange(4.0), "key": b"k" * 32}, {})


def _tensor_file(directory: Path) -> Path:
    return next(directory.glob("tensors-*.safetensors"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _tensor_file(d).write_bytes(_tensor_file(d).read_bytes()[:-3] + b"xyz"), "tensors-.*corrupt"),
    (lambda d: _tensor_file(d).unlink(), "tensors-.*file not found"),
    (lambda d: (d / META_FILE).write_text("{not json"), "party.json: corrupt"),
    (lambda d: (d / META_FILE).unlink(), "party.json: file not found"),
    (lambda d: (d / META_FILE).write_text(json.dumps(
        {**json.loads((d / META_FILE).read_text()), "format_version": FORMAT_VERSION + 1})),
     f"party.json: format version {FORMAT_VERSION + 1}"),
    (lambda d: (d / META_FILE).write_text(json.dumps({**json.loads((d / META_FILE).read_text()), "kind": "cloud"})),
     "party.json: holds a 'cloud' party"),
    (lambda d: (d / META_FILE).write_text(json.dumps(
        {**json.loads((d / META_FILE).read_text()), "state": {"w": {"__tensor__": "s.gone"}}})),
     "party.json: corrupt state tree"),
])
def test_damaged_state_is_refused_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    directory = _saved(tmp_path)
    damage(directory)
    with pytest.raises(StateError, match=message):
        read_party(directory, "tenant")


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no saved tenant state here"):
        read_party(tmp_path / "nowhere", "tenant")
