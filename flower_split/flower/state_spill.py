"""A node's large state tensors in files beside ``Context.state``, so that the Context stays small.

Flower ships a node's whole ``Context`` with every message: in a simulation to the Ray worker and
back, in a deployment between the SuperNode and the ClientApp process. A secure MiniLM tenant's
state is 6-30 MiB (its halves, rollback points and the step in flight), so ten tenants at ten
messages per step move gigabytes a round for state the tenant already holds (docs/BENCHMARKS.md,
"A tenant's state out of the Context"). With a spill directory (node config ``state-spill`` or
environment variable ``FLOWER_SPLIT_STATE_SPILL``; ``flower-split simulate`` and ``compare`` set
one per secure run and delete it afterwards, unless the environment names one or ``off``) each state Array of at least :data:`MIN_SPILL_BYTES` lies in a file of its
own and ``Context.state`` holds a small reference Array in its place (:data:`SPILL_STYPE`).

* **Written once.** A file is named by a fresh random token, written to a temporary name and
  renamed (never half a file), 0600 in a 0700 directory per run and node, and never changed; a
  live party's unchanged Arrays (:data:`~flower_split.flower.context_state.ArrayMemo`) keep
  their file, so a save writes only the tensors that changed since the last one.
* **Collected.** A save deletes every file that neither it, nor the state it replaces, nor the
  state its message came with refers to. A message that fails, or whose new Context is lost,
  leaves the node with the state it came with, whose files are still there.
* **Checked.** A reference whose file is missing or of another size is a ``ProtocolError``
  naming it, never a state of zeros.
* **Not with a mirror.** A node that mirrors its state to disk (``state-dir``,
  :mod:`~flower_split.flower.node_state`) spills nothing: the mirror must hold the whole state.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context

from flower_split.protocol import ProtocolError
from flower_split.state.store import make_private_dir

SPILL_CONFIG, SPILL_ENV, SPILL_OFF = "state-spill", "FLOWER_SPLIT_STATE_SPILL", "off"
SPILL_STYPE = "flower_split.spilled"
"""``Array.stype`` of a reference: ``data`` is JSON ``{"file", "stype", "bytes"}`` of the Array it
stands for; ``dtype`` and ``shape`` are that Array's."""
MIN_SPILL_BYTES = 64 * 1024
"""Smaller Arrays stay in the Context: a file per small tensor would cost more than it saves."""
_TMP = ".tmp-"


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


def _reference(array: Array) -> dict | None:
    if array.stype != SPILL_STYPE:
        return None
    try:
        ref = json.loads(bytes(array.data).decode())
        if (not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("stype"), str)
                or not isinstance(ref.get("bytes"), int) or not ref["file"].isalnum()):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("a spilled state reference is malformed") from None
    return ref


def references(arrays: ArrayRecord | None) -> set[str]:
    """The files ``arrays`` refers to."""
    found = set()
    for array in (arrays or ArrayRecord()).values():
        ref = _reference(array)
        if ref is not None:
            found.add(ref["file"])
    return found


class SpillStore:
    """The files of one node's spilled state in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # the file of each Array of the last save or restore, by id (the Array kept, so the id
        # stays its own): an Array the next save reuses unchanged is not written again
        self._files: dict[int, tuple[Array, str]] = {}
        self._held: set[str] = set()  # the files of the state the current message came with

    def hold(self, arrays: ArrayRecord | None) -> None:
        """Keep the files of ``arrays`` (the state a message came with) until the next message's
        :meth:`hold`: a message that fails after saving goes back to that state."""
        self._held = references(arrays)

    def spill(self, arrays: ArrayRecord, replaced: ArrayRecord | None) -> ArrayRecord:
        """``arrays`` with every large Array in a file and a reference in its place; then every
        file goes that is referred to by neither the result, nor ``replaced`` (the state it
        replaces), nor the state the message came with (:meth:`hold`)."""
        make_private_dir(self.directory)
        out, files = ArrayRecord(), {}
        for key, array in arrays.items():
            if array.stype == SPILL_STYPE or len(array.data) < MIN_SPILL_BYTES:
                out[key] = array
                continue
            hit = self._files.get(id(array))
            name = hit[1] if hit is not None and hit[0] is array else self._write(bytes(array.data))
            files[id(array)] = (array, name)
            ref = json.dumps({"file": name, "stype": array.stype, "bytes": len(array.data)}).encode()
            out[key] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=SPILL_STYPE, data=ref)
        self._files = files
        self._collect(references(out) | references(replaced) | self._held)
        return out

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

    def _write(self, data: bytes) -> str:
        name = secrets.token_hex(16)
        tmp = self.directory / f"{_TMP}{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return name

    def _collect(self, keep: set[str]) -> None:
        """Delete every file of the directory not in ``keep`` (and any temporary file left behind)."""
        for entry in os.scandir(self.directory):
            if entry.name not in keep and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)


_STORES: dict[Path, SpillStore] = {}


def spill_store(directory: Path) -> SpillStore:
    """This process's store of ``directory`` (one per node and run, kept between messages)."""
    return _STORES.setdefault(directory, SpillStore(directory))
