"""The FedAvg-family ServerApp's saved state: a long baseline survives a stopped ServerApp.

A converged FedAvg-LoRA baseline on MiniLM takes many CPU hours; a run that dies at round 7 of
20 should not start again from round 0. With run config ``state-dir`` the ServerApp of
:mod:`flower_split.flower.fedavg_server_app` saves after every round (at Flower's last hook of
a round, the ServerApp-side evaluation): the global trainable parameters, the strategy's
history and plateau state (:meth:`FedAvgLora.state_dict`) and, in a simulation, the
collector's per-round costs (``journal``), to ``state-dir/<session>/cloud/`` (a
:mod:`flower_split.state` party directory of kind ``cloud``, written atomically; the previous
save stays until the new one is whole).

A ServerApp started with the same ``session`` finds it and goes on after the last saved round
(the round in flight when it stopped is run again from the saved global model, with the same
seeds). It refuses, with :class:`StateError` naming the file, a state saved by another baseline,
by a split cloud, or under another run config (every key but where state goes and how long to
wait for replies: a changed learning rate or round count would silently mix two runs).
Local-only tenants keep their own models on their nodes; with node config ``state-dir`` (in a
simulation: ``FLOWER_SPLIT_STATE_DIR``) they mirror them too
(:mod:`flower_split.flower.fedavg_client_app`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any, Mapping, Protocol

from flwr.app import ArrayRecord
from flwr.common import log

from flower_split.flower.settings import FlowerSettings
from flower_split.state import CLOUD, StateError, cloud_dir, read_party, write_party
from flower_split.state.store import make_private_dir
from flower_split.state.layout import session_dir

# run config keys that say where state goes or how long to wait, not what the run computes
VOLATILE_KEYS = frozenset({"state-dir", "session", "reply-timeout", "node-wait-timeout", "results-dir"})


class Resumable(Protocol):
    """What a checkpoint saves and restores besides the strategy (the simulation's collector)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def run_config_sha256(run_config: Mapping[str, Any]) -> str:
    """The fingerprint of what a run computes: its run config without :data:`VOLATILE_KEYS`."""
    values = {key.replace("_", "-"): value for key, value in run_config.items()}
    kept = {key: value for key, value in sorted(values.items()) if key not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FedAvgCheckpoint:
    """Where one FedAvg-family session saves, and what its state must match to be resumed."""

    directory: Path
    baseline: str
    fingerprint: str

    def resume(self, strategy: Any, journal: Resumable | None = None) -> tuple[int, ArrayRecord | None]:
        """(last completed round, saved global parameters), after loading the strategy's (and the
        journal's) state; (0, None) when nothing was saved."""
        if not (self.directory / "party.json").exists():
            return 0, None
        saved = read_party(self.directory, CLOUD)
        meta, where = saved.meta, saved.meta_file
        if "baseline" not in meta:
            raise StateError(f"{where}: saved by a split cloud ({meta.get('security')!r}), not a FedAvg-family one")
        if meta["baseline"] != self.baseline:
            raise StateError(f"{where}: saved by a {meta['baseline']!r} run, this run is {self.baseline!r}")
        if meta.get("run_config_sha256") != self.fingerprint:
            raise StateError(f"{where}: saved under another run config; start another session "
                             "(run config session) or delete the directory to start over")
        completed = meta.get("completed_round")
        if not isinstance(completed, int) or isinstance(completed, bool) or completed < 1:
            raise StateError(f"{where}: corrupt metadata (completed_round {completed!r})")
        state = saved.state
        try:
            arrays = ArrayRecord(torch_state_dict=state["arrays"]) if state["arrays"] else None
            strategy.load_state_dict(state["strategy"])
            if journal is not None:
                journal.load_state_dict(state["journal"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{where}: the saved state does not fit this run ({exc!r})") from exc
        log(INFO, "%s: resumed from %s after round %d", self.baseline, self.directory, completed)
        return completed, arrays

    def check_writable(self) -> None:
        """Fail now, not after round 1's compute, when the state cannot be written here (a new
        directory is made private; an existing one is left as it is)."""
        try:
            directory = self.directory if self.directory.is_dir() else make_private_dir(self.directory)
            handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
            os.close(handle)
            os.unlink(probe)
        except OSError as exc:
            raise StateError(f"{self.directory}: the state directory is not writable ({exc})") from exc

    def save(self, strategy: Any, completed_round: int, arrays: ArrayRecord,
             journal: Resumable | None = None) -> None:
        """Save the state after ``completed_round`` atomically."""
        state = {"arrays": arrays.to_torch_state_dict() if len(arrays) else {},
                 "strategy": strategy.state_dict(),
                 "journal": journal.state_dict() if journal is not None else None}
        meta = {"baseline": self.baseline, "run_config_sha256": self.fingerprint,
                "completed_round": completed_round}
        write_party(self.directory, CLOUD, state, meta)


def fedavg_checkpoint(settings: FlowerSettings, run_id: int, baseline: str,
                      run_config: Mapping[str, Any]) -> FedAvgCheckpoint | None:
    """The session's checkpoint under run config ``state-dir``; None when it is not set."""
    if not settings.state_dir:
        return None
    directory = cloud_dir(session_dir(settings.state_dir, settings.session_name(run_id)))
    return FedAvgCheckpoint(directory, baseline, run_config_sha256(run_config))
