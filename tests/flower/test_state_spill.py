"""A node's large state tensors in files beside ``Context.state`` (``flower.state_spill``).

The spill is storage only: a secure run with it behaves exactly as without it, a party decoded
from spilled files equals the live one, the Context holds only small Arrays, files are written
once and collected, and a missing or altered file is a named error, never a state of zeros.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.flower import secure_handlers
from flower_split.flower.party_cache import PartyCache
from flower_split.flower.state_spill import (MIN_SPILL_BYTES, SPILL_ENV, SPILL_STYPE, SpillStore, references,
                                             spill_dir)
from flower_split.protocol import ProtocolError

from test_party_cache import _same
from test_secure_flower import SECURE, _strategy
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.tenant import tenant_data


def _record(**sizes: int) -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.integers(0, 2**60, size=n // 8, dtype=np.int64)) for k, n in sizes.items()})


def _same_arrays(**arrays: Array) -> ArrayRecord:
    """A record of these very Arrays (the constructor would copy them; a save sets them one by one)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_large_arrays_go_to_private_files_once_and_come_back_equal(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "node")
    arrays = _record(big=4 * MIN_SPILL_BYTES, small=MIN_SPILL_BYTES // 2)
    spilled = store.spill(arrays, None)
    assert spilled["small"] is arrays["small"]  # small Arrays stay in the Context
    assert spilled["big"].stype == SPILL_STYPE and len(spilled["big"].data) < 200
    assert (spilled["big"].dtype, tuple(spilled["big"].shape)) == (arrays["big"].dtype, tuple(arrays["big"].shape))
    (name,) = references(spilled)
    assert _files(tmp_path / "node") == {name}
    assert stat.S_IMODE(os.stat(tmp_path / "node").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "node" / name).st_mode) == 0o600
    back = store.unspill(spilled)
    assert bytes(back["big"].data) == bytes(arrays["big"].data) and back["big"].stype == arrays["big"].stype
    assert np.array_equal(back["big"].numpy(), arrays["big"].numpy())
    # the same Array saved again keeps its file; a changed one gets a new file and the old one goes
    again = store.spill(_same_arrays(big=arrays["big"], small=arrays["small"]), spilled)
    assert references(again) == {name}
    changed = store.spill(_record(big=4 * MIN_SPILL_BYTES), again)
    (new,) = references(changed)
    assert new != name and _files(tmp_path / "node") == {name, new}  # the replaced state's file is kept
    store.spill(_same_arrays(big=changed["big"]), changed)  # references only: nothing written
    assert _files(tmp_path / "node") == {new}


def test_a_missing_altered_or_malformed_spill_file_is_a_named_error(tmp_path: Path) -> None:
    store = SpillStore(tmp_path / "node")
    spilled = store.spill(_record(big=2 * MIN_SPILL_BYTES), None)
    (name,) = references(spilled)
    path = tmp_path / "node" / name
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ProtocolError, match="holds .* bytes"):
        store.unspill(spilled)
    path.unlink()
    with pytest.raises(ProtocolError, match="cannot read"):
        store.unspill(spilled)
    for data in (b"not json", b'{"file": "../x", "stype": "s", "bytes": 1}', b'["a"]', b"\xff"):
        bad = ArrayRecord({"big": Array(dtype="int64", shape=(1,), stype=SPILL_STYPE, data=data)})
        with pytest.raises(ProtocolError, match="malformed"):
            store.unspill(bad)


def test_no_spill_without_a_directory_when_off_or_with_a_mirror(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SPILL_ENV, raising=False)
    context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
    assert spill_dir(context, mirrored=False) is None
    monkeypatch.setenv(SPILL_ENV, "off")
    assert spill_dir(context, mirrored=False) is None
    monkeypatch.setenv(SPILL_ENV, str(tmp_path))
    assert spill_dir(context, mirrored=False) == tmp_path / "run-7" / "node-3"
    assert spill_dir(context, mirrored=True) is None  # the mirror must hold the whole state
    context.node_config["state-spill"] = 5
    with pytest.raises(ProtocolError, match="state-spill"):
        spill_dir(context, mirrored=False)


@pytest.mark.parametrize("cached", [True, False])
def test_a_secure_run_with_spilled_state_equals_the_decoded_party(cached: bool, task_identity: None, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Every message of a secure round with the spill on: the Context holds no large Array, every
    file on disk is one the state refers to, and the party decoded from the files equals the live
    one. Uncached, every message decodes from the files (a simulation worker that changed)."""
    if not cached:
        monkeypatch.setattr(secure_handlers, "PARTIES", PartyCache(capacity=0))
    config = {**SECURE, "label-protection": "client", "local-steps": 2, "num-server-rounds": 1}
    app = make_client_app(config)
    run_config, settings = settings_from_run_config(config)
    spill = tmp_path / "spill"
    seen: list[int] = []
    previous: dict[int, set[str]] = {}
    differences: list[str] = []

    def checking_app(message: Message, context: Context) -> Message:
        reply = app(message, context)
        arrays = context.state.get(secure_handlers.SECURE_ARRAYS)
        if arrays is None or reply.has_error():
            return reply
        assert max(len(a.data) for a in arrays.values()) < MIN_SPILL_BYTES
        directory = spill / f"run-{context.run_id}" / f"node-{context.node_id}"
        now = references(arrays)
        # nothing missing; nothing left behind but the files of the state this one replaced
        assert now <= _files(directory) <= now | previous.get(context.node_id, set())
        previous[context.node_id] = now
        seen.append(len(now))
        data = tenant_data(run_config, settings, context.node_config)
        if cached:
            key = secure_handlers._party_key(context, data, run_config, settings)
            live = secure_handlers.PARTIES.take(context.state[secure_handlers.SECURE_CONFIG][secure_handlers.LIVE_TOKEN], key)
            fresh = secure_handlers._load(context, data, run_config, settings)  # nothing live: from the files
            differences.extend(_same(vars(live), vars(fresh), message.metadata.message_type))
            secure_handlers._save(context, live, data, run_config, settings)
        return reply

    reports: list = []
    _strategy().start(LocalGrid(checking_app, 2, dealer=tmp_path, node_config={"state-spill": str(spill)}), 1,
                      eval_every=1, on_report=reports.append)
    assert differences == [] and seen and max(seen) > 0
    rounds = [r for r in reports if hasattr(r, "dropped")]
    assert rounds and rounds[0].tenants == ["tenant-0", "tenant-1"] and not rounds[0].dropped


def test_a_message_that_fails_after_saving_goes_back_to_files_still_there(tmp_path: Path) -> None:
    """Saved twice, then rolled back to the state the message came with: its files are kept."""
    store = SpillStore(tmp_path / "node")
    incoming = store.spill(_record(big=2 * MIN_SPILL_BYTES), None)
    store.hold(incoming)  # the next message loads it
    first = store.spill(_record(big=3 * MIN_SPILL_BYTES), incoming)
    store.spill(_record(big=5 * MIN_SPILL_BYTES), first)  # a second save in the same message
    assert references(incoming) <= _files(tmp_path / "node")
    assert np.array_equal(store.unspill(incoming)["big"].numpy(), _record(big=2 * MIN_SPILL_BYTES)["big"].numpy())
    store.hold(first)  # the message after: what came with the failed one may go now
    store.spill(_record(big=MIN_SPILL_BYTES), first)
    assert not references(incoming) & _files(tmp_path / "node")
