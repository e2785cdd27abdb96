"""A node's large state tensors in files beside ``Context.state``, so that the Context stays small.

Flower ships a node's whole ``Context`` with every message: in a simulation to the Ray worker and
back, in a deployment between the SuperNode and the ClientApp process. A secure MiniLM tenant's
state is 6-30 MiB (its halves, rollback points and the step in flight), so ten tenants at ten
messages per step move gigabytes a round for state the tenant already holds (docs/BENCHMARKS.md,
"A tenant's state out of the Context"). With a spill directory (node config ``state-spill`` or
environment variable ``FLOWER_SPLIT_STATE_SPILL``; ``flower-split simulate`` and ``compare`` set
one per secure run and delete it afterwards, unless the environment names one or ``off``) each state Array of at least :data:`MIN_SPILL_BYTES` lies in a file of its
own and ``Context.state`` holds a small reference Array in its place (:data:`SPILL_STYPE`).

* **Written once.** A file is named by its *generation* (one more than the generation of the
  state the message came with, which the state's meta carries) and a fresh random token, written to a temporary name and
  renamed (never half a file), 0600, and never changed. A live party's unchanged Arrays
  (:data:`~flower_split.flower.context_state.ArrayMemo`) keep their file (checked to be there)
  and their reference Array (a reference is parsed once per process),
  so in a long-lived process a save writes only the tensors that changed since the last one.
* **Collected, never too early.** A save deletes only its own kind of file (by name) that
  neither it, nor the state it replaces, nor the state its message came with refers to, and only
  of a generation at least two below that state's. A message that fails, or whose new Context is
  lost, leaves the node with a state whose files are still there; so does a message that ran
  beside another of the same node (Flower does not serialise a node's messages: whichever
  Context is written back last wins, and its files were written in that state's generation or
  the one after).
* **Private.** ``<state-spill>/run-<run id>/node-<node id>``: the last two are created 0700 and
  must be real directories (no symbolic link) owned by this user, so nobody else can place or
  swap files there even on a shared tmpfs.
* **Checked.** A reference whose file is missing or of another size is a ``ProtocolError``
  naming it, never a state of zeros. (Sizes only: the directory is the node's own.)
* **Not with a mirror.** A node that mirrors its state to disk (``state-dir``,
  :mod:`~flower_split.flower.node_state`) spills nothing: the mirror must hold the whole state.
* **Left behind.** The files of a node's last states stay after its run (they hold its shares
  and halves): a simulation deletes its temporary directory; a deployment should delete
  ``run-<id>`` once the run is over.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import weakref
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from flwr.app import Array, ArrayRecord, Context

from flower_split.protocol import ProtocolError

SPILL_CONFIG, SPILL_ENV, SPILL_OFF = "state-spill", "FLOWER_SPLIT_STATE_SPILL", "off"
SPILL_STYPE = "flower_split.spilled"
"""``Array.stype`` of a reference: ``data`` is JSON ``{"file", "stype", "bytes"}`` of the Array it
stands for; ``dtype`` and ``shape`` are that Array's."""
MIN_SPILL_BYTES = 64 * 1024
"""Smaller Arrays stay in the Context: a file per small tensor would cost more than it saves."""
KEPT_GENERATIONS = 2
"""A file of generation >= (the incoming state's) - 1 is never collected (see the module doc)."""
_NAME = re.compile(r"g([0-9]{1,12})-[0-9a-f]{32}")
_TMP = ".tmp"


def spill_dir(context: Context, mirrored: bool) -> Path | None:
    """This node's spill directory for this run: ``<state-spill>/run-<run id>/node-<node id>``;
    None without ``state-spill``, with ``state-spill = "off"``, or when the node mirrors its
    state (``mirrored``)."""
    root = context.node_config.get(SPILL_CONFIG) or os.environ.get(SPILL_ENV, "")
    if not root or root == SPILL_OFF or mirrored:
        return None
    if not isinstance(root, str):
        raise ProtocolError(f"node config {SPILL_CONFIG}: expected a directory path, got {root!r}")
    return Path(root) / f"run-{int(context.run_id)}" / f"node-{int(context.node_id)}"


_PARSED: dict[int, tuple[weakref.ref, bytes, Mapping[str, Any]]] = {}
"""References parsed in this process, by Array (a weak reference: an Array that is gone leaves;
its bytes: an Array given other bytes is parsed again). A live node's messages hand back the
Arrays of its last save, ~100 references read twice per message (the state it came with, the
state a save replaces): parsed once each, and read-only."""


def _reference(array: Array) -> Mapping[str, Any] | None:
    if array.stype != SPILL_STYPE:
        return None
    known = _PARSED.get(id(array))
    if known is not None and known[0]() is array and known[1] is array.data:
        return known[2]
    return _remember(array, _parse(array))


def _remember(array: Array, ref: dict) -> Mapping[str, Any]:
    key, frozen = id(array), MappingProxyType(dict(ref))
    _PARSED[key] = (weakref.ref(array, lambda _, key=key: _PARSED.pop(key, None)), array.data, frozen)
    return frozen


def _parse(array: Array) -> dict:
    try:
        ref = json.loads(bytes(array.data).decode())
        if (not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("stype"), str)
                or not isinstance(ref.get("bytes"), int) or not _NAME.fullmatch(ref["file"])):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("a spilled state reference is malformed") from None
    return ref


def _file(array: Array) -> str | None:
    """The file a reference names; None for an Array that is no reference."""
    ref = _reference(array)
    return None if ref is None else ref["file"]


def references(arrays: ArrayRecord | None) -> set[str]:
    """The files ``arrays`` refers to."""
    return {name for name in map(_file, (arrays or ArrayRecord()).values()) if name is not None}


def _generation(name: str) -> int:
    match = _NAME.fullmatch(name.removesuffix(_TMP))
    return int(match.group(1)) if match else -1


def _private_dir(directory: Path) -> None:
    """Create ``run-<id>`` and ``node-<id>`` 0700 if missing; refuse either when it is a link, not
    a directory, not this user's or writable by others (the root above them may be shared)."""
    directory.parent.parent.mkdir(parents=True, exist_ok=True)
    for path in (directory.parent, directory):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o022:
            raise ProtocolError(f"{SPILL_CONFIG}: {path} is not a private directory of this user (a link, another "
                                "owner or writable by others): refused")


class SpillStore:
    """The files of one node's spilled state in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._checked = False
        # the file and reference of each Array of the last save, by id (a weak reference: the
        # party's memo holds the Array while the party lives): an Array the next save reuses is
        # neither written nor referred to anew
        self._files: dict[int, tuple[weakref.ref, str, Array]] = {}
        self._held: tuple[set[str], int] = (set(), 0)  # the state the current message came with

    def hold(self, arrays: ArrayRecord | None, generation: int) -> None:
        """Keep the files of ``arrays`` (the state a message came with, of ``generation``) until
        the next message's :meth:`hold`: a message that fails after saving goes back to it."""
        self._held = (references(arrays), generation)

    def spill(self, arrays: ArrayRecord, replaced: ArrayRecord | None, replaced_generation: int) -> tuple[ArrayRecord, int]:
        """``arrays`` with every large Array in a file and a reference in its place, and their
        generation (for the state's meta); then the files no state may need any more go (the
        module doc: collected, never too early). ``replaced``: the state this one replaces."""
        if not self._checked:
            _private_dir(self.directory)
            self._checked = True
        held, held_generation = self._held
        before = references(replaced)
        generation = 1 + max(held_generation, replaced_generation)
        out, files, named = ArrayRecord(), {}, set()
        for key, array in arrays.items():
            if array.stype == SPILL_STYPE or len(array.data) < MIN_SPILL_BYTES:
                out[key] = array
                passed = _file(array)  # a reference a save passes through (none today): its file stays
                if passed is not None:
                    named.add(passed)
                continue
            hit = self._files.get(id(array))
            if hit is None or hit[0]() is not array or not self._present(hit[1], len(array.data)):
                name = self._write(array.data, generation)
                ref = {"file": name, "stype": array.stype, "bytes": len(array.data)}
                reference = Array(dtype=array.dtype, shape=tuple(array.shape), stype=SPILL_STYPE,
                                  data=json.dumps(ref).encode())
                _remember(reference, ref)
                hit = (weakref.ref(array), name, reference)
            files[id(array)] = hit  # unchanged since the last save: the same file and reference
            named.add(hit[1])
            out[key] = hit[2]
        self._files = files
        self._collect(named | before | held, generation - 1 - KEPT_GENERATIONS)
        return out, generation

    def unspill(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` with every reference replaced by the Array it stands for."""
        out = ArrayRecord()
        for key, array in arrays.items():
            ref = _reference(array)
            if ref is None:
                out[key] = array
                continue
            path = self.directory / ref["file"]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ProtocolError(f"spilled state {key}: cannot read {path} ({exc.strerror}): the node's "
                                    f"{SPILL_CONFIG} directory was removed or belongs to another machine") from None
            if len(data) != ref["bytes"]:
                raise ProtocolError(f"spilled state {key}: {path} holds {len(data)} bytes, the state expects {ref['bytes']}")
            out[key] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=ref["stype"], data=data)
        return out

    def _present(self, name: str, size: int) -> bool:
        try:
            return os.stat(self.directory / name).st_size == size
        except OSError:
            return False

    def _write(self, data: bytes, generation: int) -> str:
        name = f"g{generation}-{secrets.token_hex(16)}"
        tmp = self.directory / f"{name}{_TMP}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return name

    def _collect(self, keep: set[str], newest: int) -> None:
        """Delete this module's files (by name) not in ``keep`` of generation <= ``newest``."""
        for entry in os.scandir(self.directory):
            if entry.name not in keep and 0 <= _generation(entry.name) <= newest:
                Path(entry.path).unlink(missing_ok=True)


_STORES: dict[Path, SpillStore] = {}


def spill_store(directory: Path) -> SpillStore:
    """This process's store of ``directory`` (one per node and run, kept between messages)."""
    store = _STORES.get(directory)
    if store is None:
        store = _STORES[directory] = SpillStore(directory)
    return store
