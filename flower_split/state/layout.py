"""Where each party's state lives under a run's state directory, and the fingerprint checks.

::

    STATE/tenants/<tenant>/   the tenant: adapters or adapter halves, optimizer state, keys, step counter
    STATE/cloud/              the cloud: per-tenant halves and counters, tenant ids, the body's SHA-256
    STATE/dealer/             the dealer (secure only): its key, per-tenant keys and counters

One directory per party, because in a deployment each lives on another machine: the
cloud's directory never holds a tenant secret, and the body is referenced by its
fingerprint (``Body.fingerprint()``, SHA-256 over its parameters), never copied.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from flower_split.state.store import StateError

TENANT, CLOUD, DEALER = "tenant", "cloud", "dealer"
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def tenant_dir(root: str | Path, tenant: str) -> Path:
    """The directory of ``tenant``'s state (the id must be a plain file name)."""
    if not _TENANT_NAME.match(tenant):
        raise StateError(f"tenant id {tenant!r}: not usable as a directory name")
    return Path(root) / "tenants" / tenant


def session_dir(root: str | Path, session: str) -> Path:
    """A Flower run's state under a node's or the cloud's ``state-dir``: ``root/<session>``."""
    if not _TENANT_NAME.match(session):
        raise StateError(f"session {session!r}: not usable as a directory name (letters, digits, . _ -)")
    return Path(root) / session


def cloud_dir(root: str | Path) -> Path:
    return Path(root) / CLOUD


def dealer_dir(root: str | Path) -> Path:
    return Path(root) / DEALER


def find_state_root(path: str | Path) -> Path:
    """``path`` itself, or ``path/state`` (a ``train --out`` directory); StateError if neither holds tenants."""
    path = Path(path)
    for candidate in (path, path / "state"):
        if (candidate / "tenants").is_dir():
            return candidate
    if not path.exists():
        raise StateError(f"{path}: state directory not found")
    raise StateError(f"{path}: no saved state here (expected {path / 'state' / 'tenants'} or "
                     f"{path / 'tenants'}; `flower-split train --out DIR` writes DIR/state)")


def only_tenant(root: str | Path) -> str:
    """The id of the one tenant saved under ``root`` (StateError if none or several)."""
    names = sorted(p.name for p in (Path(root) / "tenants").iterdir() if p.is_dir())
    if len(names) != 1:
        raise StateError(f"{Path(root) / 'tenants'}: expected one tenant, found {names or 'none'}; name one")
    return names[0]


def module_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, then bytes), like ``Body.fingerprint``."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_fingerprint(meta_file: Path, what: str, saved: object, actual: str) -> None:
    """StateError naming ``meta_file`` unless the saved fingerprint of ``what`` equals ``actual``."""
    if saved != actual:
        raise StateError(f"{meta_file}: the {what} differs from the one this state was trained with "
                         f"(saved SHA-256 {saved}, loaded {actual}); load the same model")
