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
from flower_split.flower.state_spill import (MIN_SPILL_BYTES, SPILL_ENV, SPILL_STYPE, SpillStore, _reference,
                                             references, spill_dir)
from flower_split.protocol import ProtocolError

from test_party_cache import live_and_decoded
from test_secure_flower import SECURE, _strategy
from flower_split.flower.settings import settings_from_run_config


def _record(seed: int = 0, **sizes: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.integers(0, 2**60, size=n // 8, dtype=np.int64)) for k, n in sizes.items()})


def _same_arrays(**arrays: Array) -> ArrayRecord:
    """A record of these very Arrays (the constructor would copy them; a save sets them one by one)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _node(tmp_path: Path) -> Path:
    return tmp_path / "run-1" / "node-2"


State = tuple[ArrayRecord, int]  # a saved state's Arrays and its spill generation


def _save(store: SpillStore, arrays: ArrayRecord, replaced: State | None = None) -> State:
    """A handler's save: the state it replaces is the one its message came with, held first."""
    if replaced is not None:
        store.hold(*replaced)
    return store.spill(arrays, *(replaced or (None, 0)))


def _big(seed: int, size: int = 2 * MIN_SPILL_BYTES) -> np.ndarray:
    return _record(seed, big=size)["big"].numpy()


def test_large_arrays_go_to_private_files_once_and_come_back_equal(tmp_path: Path) -> None:
    node = _node(tmp_path)
    store = SpillStore(node)
    arrays = _record(big=4 * MIN_SPILL_BYTES, small=MIN_SPILL_BYTES // 2)
    first = _save(store, arrays)
    spilled = first[0]
    assert spilled["small"] is arrays["small"]  # small Arrays stay in the Context
    assert spilled["big"].stype == SPILL_STYPE and len(spilled["big"].data) < 200
    assert (spilled["big"].dtype, tuple(spilled["big"].shape)) == (arrays["big"].dtype, tuple(arrays["big"].shape))
    (name,) = references(spilled)
    assert _files(node) == {name}
    for path in (node, node.parent):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(node / name).st_mode) == 0o600
    back = store.unspill(spilled)
    assert bytes(back["big"].data) == bytes(arrays["big"].data) and back["big"].stype == arrays["big"].stype
    assert np.array_equal(back["big"].numpy(), arrays["big"].numpy())
    # the same Array saved again keeps its file; a changed one gets a new file, the old one stays
    # while a state that may still be written back refers to it, and goes two generations on
    states = [_save(store, _same_arrays(big=arrays["big"], small=arrays["small"]), first)]
    assert references(states[0][0]) == {name} and states[0][1] == first[1] + 1
    assert states[0][0]["big"] is spilled["big"]  # its reference too: nothing built or parsed again
    for seed in range(1, 5):
        states.append(_save(store, _record(seed, big=4 * MIN_SPILL_BYTES), states[-1]))
    kept = set().union(*(references(state) for state, _ in states[-3:]))
    assert _files(node) == kept and name not in _files(node)
    # a state with nothing to spill still moves the generation on, and old files still go
    states.append(_save(store, _record(9, big=MIN_SPILL_BYTES // 2), states[-1]))
    states.append(_save(store, _record(9, big=MIN_SPILL_BYTES // 2), states[-1]))
    states.append(_save(store, _record(9, big=MIN_SPILL_BYTES // 2), states[-1]))
    assert _files(node) == set()


def test_a_reused_file_that_went_missing_is_written_again(tmp_path: Path) -> None:
    store = SpillStore(_node(tmp_path))
    arrays = _record(big=2 * MIN_SPILL_BYTES)
    first = _save(store, arrays)
    for path in _node(tmp_path).iterdir():
        path.unlink()
    second = _save(store, _same_arrays(big=arrays["big"]), first)
    assert references(second[0]) <= _files(_node(tmp_path))
    assert np.array_equal(SpillStore(_node(tmp_path)).unspill(second[0])["big"].numpy(), arrays["big"].numpy())


def test_two_messages_of_one_node_at_once_keep_both_states(tmp_path: Path) -> None:
    """Flower may run two messages of a node at once (a message the cloud gave up on, and the
    next), each from the same Context, in two processes; whichever is written back last wins, so
    neither save may collect the other's files (a review's demonstration). Nor may the next
    message's save, from either."""
    incoming = _save(SpillStore(_node(tmp_path)), _record(0, big=2 * MIN_SPILL_BYTES))
    late = _save(SpillStore(_node(tmp_path)), _record(2, big=2 * MIN_SPILL_BYTES), incoming)
    early = _save(SpillStore(_node(tmp_path)), _record(1, big=2 * MIN_SPILL_BYTES), incoming)
    for state, seed in ((late, 2), (early, 1)):
        assert np.array_equal(SpillStore(_node(tmp_path)).unspill(state[0])["big"].numpy(), _big(seed))
    _save(SpillStore(_node(tmp_path)), _record(3, big=2 * MIN_SPILL_BYTES), early)  # the next, from one of them
    for state, seed in ((late, 2), (early, 1)):
        assert np.array_equal(SpillStore(_node(tmp_path)).unspill(state[0])["big"].numpy(), _big(seed))


def test_a_linked_or_foreign_directory_is_refused_and_nothing_else_is_deleted(tmp_path: Path) -> None:
    """A spill root on a shared tmpfs: whoever made ``node-<id>`` a link to another directory must
    not get the tenant to write there or delete its files (a review's demonstration)."""
    victim = tmp_path / "home" / ".ssh"
    victim.mkdir(parents=True)
    (victim / "id_ed25519").write_text("secret key")
    (tmp_path / "shm" / "run-1").mkdir(parents=True, mode=0o700)
    (tmp_path / "shm" / "run-1" / "node-2").symlink_to(victim)
    with pytest.raises(ProtocolError, match="not a private directory"):
        _save(SpillStore(tmp_path / "shm" / "run-1" / "node-2"), _record(big=2 * MIN_SPILL_BYTES))
    assert _files(victim) == {"id_ed25519"}
    (tmp_path / "open" / "run-1" / "node-2").mkdir(parents=True)
    os.chmod(tmp_path / "open" / "run-1", 0o777)
    with pytest.raises(ProtocolError, match="not a private directory"):
        _save(SpillStore(tmp_path / "open" / "run-1" / "node-2"), _record(big=2 * MIN_SPILL_BYTES))
    node = _node(tmp_path / "mine")
    node.mkdir(parents=True, mode=0o700)
    (node / "notes.txt").write_text("not a spill file")
    (node / "g1-notes").write_text("not a spill file either")
    store = SpillStore(node)
    state = _save(store, _record(big=2 * MIN_SPILL_BYTES))
    for seed in range(1, 6):
        state = _save(store, _record(seed, big=2 * MIN_SPILL_BYTES), state)
    assert {"notes.txt", "g1-notes"} <= _files(node)  # only this module's own names are ever collected


def test_a_missing_altered_or_malformed_spill_file_is_a_named_error(tmp_path: Path) -> None:
    store = SpillStore(_node(tmp_path))
    spilled, _ = _save(store, _record(big=2 * MIN_SPILL_BYTES))
    (name,) = references(spilled)
    path = _node(tmp_path) / name
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ProtocolError, match="holds .* bytes"):
        store.unspill(spilled)
    path.unlink()
    with pytest.raises(ProtocolError, match="cannot read"):
        store.unspill(spilled)
    for data in (b"not json", b'{"file": "../x", "stype": "s", "bytes": 1}', b'["a"]', b"\xff",
                 b'{"file": "notes", "stype": "s", "bytes": 1}'):
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
    previous: dict[int, list[set[str]]] = {}
    differences: list[str] = []

    def checking_app(message: Message, context: Context) -> Message:
        reply = app(message, context)
        arrays = context.state.get(secure_handlers.SECURE_ARRAYS)
        if arrays is None or reply.has_error():
            return reply
        assert max(len(a.data) for a in arrays.values()) < MIN_SPILL_BYTES
        directory = spill / f"run-{context.run_id}" / f"node-{context.node_id}"
        now = references(arrays)
        history = previous.setdefault(context.node_id, [])
        history.append(now)
        # nothing missing; left behind only the files of the last few generations (a bounded few)
        assert now <= _files(directory) and len(_files(directory)) <= 4 * max(map(len, history[-4:]))
        seen.append(len(now))
        if cached:  # the party decoded from the files equals the live one
            live_and_decoded(message, context, run_config, settings, differences)
        return reply

    reports: list = []
    _strategy().start(LocalGrid(checking_app, 2, dealer=tmp_path, node_config={"state-spill": str(spill)}), 1,
                      eval_every=1, on_report=reports.append)
    assert differences == [] and seen and max(seen) > 0
    rounds = [r for r in reports if hasattr(r, "dropped")]
    assert rounds and rounds[0].tenants == ["tenant-0", "tenant-1"] and not rounds[0].dropped


def test_a_message_that_fails_after_saving_goes_back_to_files_still_there(tmp_path: Path) -> None:
    """Saved twice, then rolled back to the state the message came with: its files are kept."""
    store = SpillStore(_node(tmp_path))
    incoming = _save(store, _record(0, big=2 * MIN_SPILL_BYTES))
    store.hold(*incoming)  # the next message loads it
    first = store.spill(_record(1, big=3 * MIN_SPILL_BYTES), *incoming)
    second = store.spill(_record(2, big=5 * MIN_SPILL_BYTES), *first)  # a second save in the same message
    third = store.spill(_record(3, big=5 * MIN_SPILL_BYTES), *second)  # and a third
    assert third[1] == incoming[1] + 3
    assert references(incoming[0]) <= _files(_node(tmp_path))
    assert np.array_equal(store.unspill(incoming[0])["big"].numpy(), _big(0))


def test_a_reference_is_parsed_again_when_its_bytes_change_and_is_read_only(tmp_path: Path) -> None:
    """References are parsed once per process, by Array: an Array given other bytes (Flower allows
    it) is parsed again, malformed ones are still named, and no caller can change a parsed one."""
    state, _ = _save(SpillStore(_node(tmp_path)), _record(big=2 * MIN_SPILL_BYTES))
    reference = state["big"]
    (name,) = references(state)
    other = "g7-" + "c" * 32
    reference.data = reference.data.replace(name.encode(), other.encode())
    assert references(state) == {other}
    reference.data = b"not json"
    with pytest.raises(ProtocolError, match="malformed"):
        references(state)
    fresh, _ = _save(SpillStore(_node(tmp_path / "again")), _record(big=2 * MIN_SPILL_BYTES))
    with pytest.raises(TypeError):
        _reference(fresh["big"])["file"] = "../../etc/passwd"
