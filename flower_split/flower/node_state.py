"""A node's Flower state mirrored on its own disk, so that a restarted SuperNode resumes.

A SuperNode keeps ``context.state`` (the tenant's adapters or adapter halves, keys, step
counter and data cursors; the dealer's per-tenant keys and counters) in memory only: killed,
it comes back empty. With node config ``state-dir`` (or environment variable
``FLOWER_SPLIT_STATE_DIR``; simulations, which have no per-node config) every message that
was handled in full writes the node's whole state, with a generation number, to
``state-dir/<session>/tenants/<tenant>/`` (the dealer: ``.../dealer/``), a
:mod:`flower_split.state` party directory of kind ``node`` (temp file + fsync + rename, files
and directories 0600/0700, never half a state), and a message that finds ``context.state``
empty loads it first. Nothing is lost but the message in flight when the node died; its
replacement picks up at the same step, which the protocols' step checks allow once and only
once. Each message holds an exclusive lock on the mirror and refuses one written by anyone
else since its context last wrote it (:func:`mirrored`): two live runs of one session (a
cloud that starts a second run while the first is alive) would otherwise hold two copies of
the party that use the same step numbers, and so the same Beaver material, on other inputs.

``<session>`` is run config ``session``; empty (default), it is ``run-<Flower run id>``, so a
new run never picks up an old run's state by accident. To resume a run whose ServerApp was
stopped, start the new run with the same ``session`` (the cloud then resumes too,
:mod:`flower_split.flower.cloud_state`).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from flower_split.flower.context_state import state_array, state_tensor
from flower_split.flower.settings import FlowerSettings
from flower_split.protocol import ProtocolError
from flower_split.state import StateError, dealer_dir, read_party, tenant_dir, write_party
from flower_split.state.store import make_private_dir
from flower_split.state.layout import session_dir

NODE = "node"
MIRROR_STATE = "node-mirror"  # ConfigRecord {generation}: the mirror generation this context wrote last
LOCK_FILE = ".lock"
STATE_DIR_CONFIG, STATE_DIR_ENV = "state-dir", "FLOWER_SPLIT_STATE_DIR"
_KINDS = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}


def node_state_dir(context: Context, settings: FlowerSettings, tenant: str | None) -> Path | None:
    """Where this node mirrors its state: ``<session>/tenants/<tenant>``, or ``<session>/dealer``
    for the dealer (``tenant`` None); None without ``state-dir``."""
    root = context.node_config.get(STATE_DIR_CONFIG) or os.environ.get(STATE_DIR_ENV, "")
    if not root:
        return None
    if not isinstance(root, str):
        raise StateError(f"node config {STATE_DIR_CONFIG}: expected a path, got {root!r}")
    session = session_dir(root, settings.session_name(context.run_id))
    return dealer_dir(session) if tenant is None else tenant_dir(session, tenant)


@contextmanager
def mirrored(context: Context, directory: Path | None, owner: Mapping[str, str],
             transient: frozenset[str] = frozenset()) -> Iterator[None]:
    """One message's hold on the node's mirror (nothing when ``directory`` is None).

    Under an exclusive lock of the mirror: an empty ``context.state`` is loaded from it (a
    restarted node); a mirror written by anyone else since this context last wrote it (a
    second run of the same session, another process) is refused with :class:`StateError`, so
    two live copies of one party can never both act (both would use the same step numbers
    and Beaver material, and their halves would diverge); after the body succeeds the state is
    written back with the next generation. ``owner`` ({role, tenant}) must match the mirror's.
    Records named in ``transient`` are never written: secrets of an exchange in progress that a
    restarted node, or a second copy of it, must not take up where the first left off.
    """
    if directory is None:
        yield
        return
    with _locked(directory):
        generation = _restore(context, directory, dict(owner))
        yield
        context.state[MIRROR_STATE] = ConfigRecord({"generation": generation + 1})
        write_party(directory, NODE, _tree(context.state, transient), {**owner, "generation": generation + 1})


def restored(context: Context, directory: Path | None, owner: Mapping[str, str]) -> None:
    """Load the mirror into an empty ``context.state`` and check it as :func:`mirrored` does,
    writing nothing. For what writes into ``context.state`` outside a handler (Flower's SecAgg+
    mod): started on the empty state of a restarted node, it would leave records there, and the
    node's next message would then find a non-empty state that did not come from its mirror and
    refuse every later message of the run."""
    if directory is None:
        return
    saved = dict(context.state.items())
    with _locked(directory):
        try:
            _restore(context, directory, dict(owner))
        except StateError:
            rollback(context, saved)  # a mirror refused after it was loaded leaves nothing behind
            raise


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the mirror in ``directory`` (created 0700 if absent)."""
    make_private_dir(directory)
    lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the lock


def _restore(context: Context, directory: Path, owner: dict[str, str]) -> int:
    """The mirror's generation, after loading it into an empty context and checking that this
    context is the one that wrote it last."""
    if not (directory / "party.json").exists():
        if MIRROR_STATE in context.state:
            raise StateError(f"{directory}: the mirror this node wrote is gone; refusing to go on without it")
        return 0
    saved = read_party(directory, NODE)
    if {k: saved.meta.get(k) for k in owner} != owner:
        raise StateError(f"{saved.meta_file}: the state of {saved.meta.get('role')} {saved.meta.get('tenant')!r}, "
                         f"not of {owner.get('role')} {owner.get('tenant')!r}")
    generation = saved.meta.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise StateError(f"{saved.meta_file}: corrupt metadata (generation {generation!r})")
    if not len(context.state):
        for key, record in records_from_tree(saved.state, saved.meta_file).items():
            context.state[key] = record
    held = context.state.get(MIRROR_STATE)
    if not isinstance(held, ConfigRecord) or held.get("generation") != generation:
        raise StateError(f"{saved.meta_file}: written by another run or process since this one last wrote it; "
                         "one live copy of a party only (stop the other run of this session)")
    return generation


def rollback(context: Context, saved: Mapping[str, Any]) -> None:
    """Put ``context.state`` back to ``saved`` (its records before a message that failed)."""
    for key in list(context.state.keys()):
        if key not in saved:
            del context.state[key]
    for key, record in saved.items():
        context.state[key] = record


def _tree(state: RecordDict, transient: frozenset[str] = frozenset()) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, record in state.items():
        if key in transient:
            continue
        if isinstance(record, ArrayRecord):
            tree[key] = {"kind": "array", "items": {name: state_tensor(f"{key}.{name}", array)
                                                    for name, array in record.items()}}
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            kind = "config" if isinstance(record, ConfigRecord) else "metric"
            tree[key] = {"kind": kind, "items": dict(record.items())}
        else:
            raise StateError(f"context.state[{key!r}]: cannot mirror a {type(record).__name__}")
    return tree


def records_from_tree(tree: object, meta_file: Path) -> dict[str, Any]:
    """The Flower records of a mirrored state tree (StateError naming ``meta_file`` if malformed)."""
    if not isinstance(tree, dict):
        raise StateError(f"{meta_file}: corrupt node state (expected a mapping of records)")
    records: dict[str, Any] = {}
    for key, entry in tree.items():
        if not isinstance(entry, dict) or entry.get("kind") not in _KINDS or not isinstance(entry.get("items"), dict):
            raise StateError(f"{meta_file}: corrupt node state (record {key!r})")
        items = entry["items"]
        try:
            if entry["kind"] == "array":
                records[key] = ArrayRecord({name: state_array(f"{key}.{name}", t) for name, t in items.items()})
            else:
                records[key] = _KINDS[entry["kind"]](items)
        except (AttributeError, TypeError, ValueError, ProtocolError) as exc:
            raise StateError(f"{meta_file}: corrupt node state (record {key!r}: {exc})") from exc
    return records
