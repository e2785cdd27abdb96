"""What every security level saves and restores the same way: metadata, models, fingerprints.

A trained run is saved as one directory per party (:mod:`flower_split.state`). The tenant's
metadata carries what rebuilding its party needs (the run's config, the label names, the
schedule's total steps) and the SHA-256 of the embedder it ran and of the body it trained
against; the cloud's carries the body's SHA-256 and the tenant ids it serves. Restoring
builds the public model pieces again from the config and refuses, naming the file, a model
whose fingerprint differs; the level's own party states are loaded by its backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from flower_split.config import ConfigError, RunConfig
from flower_split.model import SplitParts, build_split
from flower_split.state import (
    CLOUD, TENANT, SavedParty, StateError, check_fingerprint, cloud_dir, module_sha256, read_party, tenant_dir,
    write_party,
)
from flower_split.train.driver import Session


@dataclass
class SaveTo:
    """Where a training run saves its parties (a state root) and the label names of its data."""

    root: Path
    label_names: list[str]


@dataclass
class SavedRun:
    """A tenant's saved state with its cloud's, read back and checked, and the model rebuilt."""

    root: Path
    tenant: SavedParty
    cloud: SavedParty
    config: RunConfig
    label_names: list[str]
    total_steps: int
    parts: SplitParts

    @property
    def tenant_id(self) -> str:
        return str(self.tenant.meta["tenant"])


@dataclass
class Restored:
    """Live parties wired in process; ``reserve_steps(n)`` persists counters before n steps run."""

    session: Session
    reserve_steps: Callable[[int], None]


def save_common(root: str | Path, security: str, config: RunConfig, parts: SplitParts, tenant: str,
                tenant_state: Any, cloud_state: Any, label_names: Sequence[str], total_steps: int) -> None:
    """Write the tenant's and the cloud's directories (the level passes its parties' states)."""
    body_sha = parts.body.fingerprint()
    tenant_meta = {"security": security, "tenant": tenant, "config": config.to_dict(),
                   "label_names": list(label_names), "total_steps": int(total_steps),
                   "body_sha256": body_sha, "embedder_sha256": module_sha256(parts.embedder)}
    cloud_meta = {"security": security, "model": config.model, "body_sha256": body_sha, "tenants": [tenant]}
    write_party(tenant_dir(root, tenant), TENANT, tenant_state, tenant_meta)
    write_party(cloud_dir(root), CLOUD, cloud_state, cloud_meta)


def load_common(root: str | Path, tenant: str) -> SavedRun:
    """Read ``tenant``'s and the cloud's state under ``root``, rebuild the model and check it."""
    saved = read_party(tenant_dir(root, tenant), TENANT)
    meta = saved.meta
    try:
        # a run saved before tail_input existed ran its tail on every token (today's default pools)
        config = RunConfig.from_mapping({"tail_input": "tokens", **meta["config"]})
        label_names = [str(name) for name in meta["label_names"]]
        total_steps = int(meta["total_steps"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise StateError(f"{saved.meta_file}: corrupt metadata ({exc})") from exc
    cloud = read_party(cloud_dir(root), CLOUD)
    if meta.get("security") != cloud.meta.get("security"):
        raise StateError(f"{cloud.meta_file}: security {cloud.meta.get('security')!r}, the tenant's is "
                         f"{meta.get('security')!r}")
    if tenant not in cloud.meta.get("tenants", []):
        raise StateError(f"{cloud.meta_file}: the cloud holds no state of tenant {tenant!r}")
    # a prior offset is saved with the tail: a placeholder here, overwritten when the state loads
    parts = build_split(config.model, len(label_names), config.head_rank, config.tail_bottleneck,
                        config.activation, config.seed, config.tail_input,
                        prior=torch.zeros(len(label_names)) if config.prior_offset else None)
    body_sha = parts.body.fingerprint()
    check_fingerprint(cloud.meta_file, "body", cloud.meta.get("body_sha256"), body_sha)
    check_fingerprint(saved.meta_file, "body", meta.get("body_sha256"), body_sha)
    check_fingerprint(saved.meta_file, "embedder", meta.get("embedder_sha256"), module_sha256(parts.embedder))
    return SavedRun(Path(root), saved, cloud, config, label_names, total_steps, parts)


def load_party_state(saved: SavedParty, load: Callable[[Any], None]) -> None:
    """``load(saved.state)`` (a party's ``load_state_dict``), its refusal as StateError naming the file."""
    try:
        load(saved.state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise StateError(f"{saved.meta_file}: the saved {saved.kind} state does not fit ({exc!r})") from exc
