"""One party's saved state on disk: a versioned directory, written atomically, read strictly.

A party directory holds ``party.json`` (format name and version, the party kind, metadata,
the state's JSON tree and the name and SHA-256 of its tensor file) and
``tensors-<sha256 prefix>.safetensors``. A save writes the new tensor file under its own
name, then replaces ``party.json`` (temp file + ``fsync`` + ``os.replace``: the commit
point), then deletes tensor files no longer named; a crash at any moment leaves the old or
the new state, never a mix. Every file is created 0600 and directories 0700: a party's
state holds its secrets (keys, adapter halves), and no other local user may read them.

Reading refuses, with :class:`StateError` naming the file, a missing directory or file,
bytes that are not JSON or safetensors, another format version or party kind, and a tensor
file whose SHA-256 differs from the one recorded: never a silent fresh start.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from flower_split.state.codec import CodecError, decode, encode

FORMAT = "flower-split-party-state"
FORMAT_VERSION = 1
META_FILE = "party.json"
FILE_MODE = 0o600
DIR_MODE = 0o700


class StateError(RuntimeError):
    """Saved state is missing, corrupt, of another format version, or does not fit what loads it."""


@dataclass
class SavedParty:
    """A party's state as read from ``directory``: its kind, metadata and ``state_dict``."""

    directory: Path
    kind: str
    meta: dict[str, Any]
    state: Any

    @property
    def meta_file(self) -> Path:
        return self.directory / META_FILE


def write_party(directory: str | Path, kind: str, state: Any, meta: dict[str, Any]) -> Path:
    """Save ``state`` (a party's ``state_dict()``) with JSON ``meta`` into ``directory``; its path."""
    directory = make_private_dir(directory)
    tree, tensors = encode(state)
    blob = save_tensors(tensors) if tensors else b""
    digest = hashlib.sha256(blob).hexdigest()
    tensor_file = f"tensors-{digest[:16]}.safetensors"
    write_atomic(directory / tensor_file, blob)
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "meta": meta,
                "tensors": {"file": tensor_file, "sha256": digest}, "state": tree}
    write_atomic(directory / META_FILE, json.dumps(document, indent=1).encode())
    for stale in directory.glob("tensors-*.safetensors"):
        if stale.name != tensor_file:
            stale.unlink(missing_ok=True)
    return directory


def make_private_dir(directory: str | Path) -> Path:
    """``directory``, created with every missing parent 0700 (a party's directory is its alone)."""
    directory = Path(directory)
    missing = []
    for parent in (directory, *directory.parents):
        if parent.is_dir():
            break
        missing.append(parent)
    for path in reversed(missing):
        path.mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(directory, DIR_MODE)
    return directory


def write_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` through a temp file (``mode``, default 0600) in the same
    directory, ``fsync`` and ``os.replace``: a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_party(directory: str | Path, kind: str) -> SavedParty:
    """Read the ``kind`` party saved in ``directory``; :class:`StateError` naming the bad file."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise StateError(f"{directory}: no saved {kind} state here (directory not found)")
    if not meta_path.is_file():
        raise StateError(f"{meta_path}: file not found (the {kind} state is incomplete)")
    document = _read_document(meta_path, kind)
    tensor_path = directory / str(document["tensors"].get("file", ""))
    tensors = _read_tensors(tensor_path, str(document["tensors"].get("sha256", "")))
    try:
        state = decode(document["state"], tensors)
    except CodecError as exc:
        raise StateError(f"{meta_path}: corrupt state tree ({exc})") from exc
    return SavedParty(directory, kind, dict(document["meta"]), state)


def _read_document(path: Path, kind: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{path}: corrupt (not JSON: {exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise StateError(f"{path}: not a flower-split party state (expected format {FORMAT!r})")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise StateError(f"{path}: format version {version!r}; this flower-split reads version "
                         f"{FORMAT_VERSION} only (save the state again with a matching version)")
    if document.get("kind") != kind:
        raise StateError(f"{path}: holds a {document.get('kind')!r} party, expected {kind!r}")
    for key, expected in (("meta", dict), ("tensors", dict), ("state", (dict, list))):
        if not isinstance(document.get(key), expected):
            raise StateError(f"{path}: corrupt (entry {key!r} missing or malformed)")
    return document


def _read_tensors(path: Path, sha256: str) -> dict[str, Any]:
    if not path.is_file():
        raise StateError(f"{path}: file not found (named by {META_FILE})")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise StateError(f"{path}: corrupt (SHA-256 differs from the one recorded in {META_FILE})")
    if not blob:
        return {}
    try:
        return load_tensors(blob)
    except (SafetensorError, ValueError) as exc:
        raise StateError(f"{path}: corrupt (not a safetensors file: {exc})") from exc
