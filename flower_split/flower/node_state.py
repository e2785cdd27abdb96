"""A node's Flower state mirrored on its own disk, so that a restarted SuperNode resumes.

A SuperNode keeps ``context.state`` (the tenant's adapters or adapter halves, keys, step
counter and data cursors; the dealer's per-tenant keys and counters) in memory only: killed,
it comes back empty. With node config ``state-dir`` (or environment variable
``FLOWER_SPLIT_STATE_DIR``; simulations, which have no per-node config) every message that
was handled in full writes the node's whole state to ``state-dir/<session>/tenants/<tenant>/`` (the dealer: ``.../dealer/``) (a
:mod:`flower_split.state` party directory of kind ``node``: temp file + fsync + rename, files
0600, never half a state), and a message that finds ``context.state`` empty loads it first.
Nothing is lost but the message in flight when the node died; its replacement picks up at
the same step, which the protocols' step checks allow once and only once.

``<session>`` is run config ``session``; empty (default), it is ``run-<Flower run id>``, so a
new run never picks up an old run's state by accident. To resume a run whose ServerApp was
stopped, start the new run with the same ``session`` (the cloud then resumes too,
:mod:`flower_split.flower.cloud_state`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from flower_split.flower.settings import FlowerSettings
from flower_split.state import StateError, dealer_dir, read_party, tenant_dir, write_party
from flower_split.state.layout import session_dir

NODE = "node"
STATE_DIR_CONFIG, STATE_DIR_ENV = "state-dir", "FLOWER_SPLIT_STATE_DIR"
_KINDS = {"array": ArrayRecord, "config": ConfigRecord, "metric": MetricRecord}


def session_name(context: Context, settings: FlowerSettings) -> str:
    """Run config ``session``, or ``run-<run id>`` (a fresh session per run)."""
    return settings.session or f"run-{context.run_id}"


def node_state_dir(context: Context, settings: FlowerSettings, tenant: str | None) -> Path | None:
    """Where this node mirrors its state: ``<session>/tenants/<tenant>``, or ``<session>/dealer``
    for the dealer (``tenant`` None); None without ``state-dir``."""
    root = context.node_config.get(STATE_DIR_CONFIG) or os.environ.get(STATE_DIR_ENV, "")
    if not root:
        return None
    if not isinstance(root, str):
        raise StateError(f"node config {STATE_DIR_CONFIG}: expected a path, got {root!r}")
    session = session_dir(root, session_name(context, settings))
    return dealer_dir(session) if tenant is None else tenant_dir(session, tenant)


def restore_node_state(context: Context, directory: Path | None) -> bool:
    """Load the mirrored state into an empty ``context.state``; True if something was loaded.

    A ``context.state`` that holds anything is the live state and wins (it was mirrored after
    its last message). A corrupt or foreign mirror is a :class:`StateError`, never a fresh start.
    """
    if directory is None or len(context.state) or not (directory / "party.json").exists():
        return False
    saved = read_party(directory, NODE)
    records = records_from_tree(saved.state, saved.meta_file)
    for key, record in records.items():
        context.state[key] = record
    return True


def persist_node_state(context: Context, directory: Path | None, meta: Mapping[str, Any]) -> None:
    """Mirror ``context.state`` under ``directory`` (atomic; nothing when ``directory`` is None)."""
    if directory is not None:
        write_party(directory, NODE, _tree(context.state), dict(meta))


def rollback(context: Context, saved: Mapping[str, Any]) -> None:
    """Put ``context.state`` back to ``saved`` (its records before a message that failed)."""
    for key in list(context.state.keys()):
        if key not in saved:
            del context.state[key]
    for key, record in saved.items():
        context.state[key] = record


def _tree(state: RecordDict) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, record in state.items():
        if isinstance(record, ArrayRecord):
            tree[key] = {"kind": "array", "items": {name: torch.from_numpy(np.array(array.numpy(), copy=True))
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
                records[key] = ArrayRecord({name: Array(np.ascontiguousarray(t.numpy())) for name, t in items.items()})
            else:
                records[key] = _KINDS[entry["kind"]](items)
        except (AttributeError, TypeError, ValueError) as exc:
            raise StateError(f"{meta_file}: corrupt node state (record {key!r}: {exc})") from exc
    return records
