"""The cloud's saved state over Flower: the ServerApp saves its strategy, and resumes from it.

With run config ``state-dir`` the ServerApp saves, at every safe point of its strategy
(after every round; in secure mode also after every step, when no step is in flight), the
strategy's state (:meth:`SplitStrategyBase.state_dict`: per-tenant bookkeeping and the
cloud party's state; secure: every tenant's cloud halves, keys and step counters) with the
last completed round to ``state-dir/<session>/cloud/`` (a :mod:`flower_split.state` party
directory of kind ``cloud``; the body by its SHA-256 only, never copied).

A ServerApp that starts and finds that directory resumes: it loads the state (refusing, with
:class:`StateError` naming the file, another body, another security level or a corrupt
file) and goes on at the round after the last completed one; the interrupted round's work
on the tenants is kept (their nodes saved it, :mod:`flower_split.flower.node_state`), and in
secure mode every tenant's step numbers move on past any the tenant or the dealer may have
used after the save. ``<session>`` is run config ``session``, or ``run-<run id>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from pathlib import Path

from flwr.common import log

from flower_split.flower.settings import FlowerSettings
from flower_split.flower.strategy import SplitStrategyBase
from flower_split.state import CLOUD, StateError, check_fingerprint, cloud_dir, read_party, write_party
from flower_split.state.layout import session_dir


@dataclass
class CloudCheckpoint:
    """Where the cloud of one session saves, and what its state must match to be resumed."""

    directory: Path
    security: str
    body_sha256: str

    def resume(self, strategy: SplitStrategyBase) -> int:
        """Load the saved strategy if there is one; the last round it completed (0: none)."""
        if not (self.directory / "party.json").exists():
            return 0
        saved = read_party(self.directory, CLOUD)
        check_fingerprint(saved.meta_file, "body", saved.meta.get("body_sha256"), self.body_sha256)
        if saved.meta.get("security") != self.security:
            raise StateError(f"{saved.meta_file}: saved by a {saved.meta.get('security')!r} cloud, "
                             f"this run is {self.security!r}")
        completed = saved.meta.get("completed_round")
        if not isinstance(completed, int) or isinstance(completed, bool) or completed < 0:
            raise StateError(f"{saved.meta_file}: corrupt metadata (completed_round {completed!r})")
        try:
            strategy.load_state_dict(saved.state)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{saved.meta_file}: the saved cloud state does not fit ({exc!r})") from exc
        log(INFO, "flower-split cloud: resumed from %s after round %d (%d tenants trained)", self.directory,
            completed, len(strategy.trained))
        return completed

    def save(self, strategy: SplitStrategyBase, completed_round: int) -> None:
        """Write the strategy's state atomically (the previous save stays until the new one is whole)."""
        meta = {"security": self.security, "body_sha256": self.body_sha256, "completed_round": completed_round}
        write_party(self.directory, CLOUD, strategy.state_dict(), meta)


def cloud_checkpoint(settings: FlowerSettings, run_id: int, security: str,
                     body_sha256: str) -> CloudCheckpoint | None:
    """The session's checkpoint under run config ``state-dir``; None when it is not set."""
    if not settings.state_dir:
        return None
    return CloudCheckpoint(cloud_dir(session_dir(settings.state_dir, settings.session_name(run_id))), security,
                           body_sha256)
