"""A party's rollback points: its halves before each of its last training steps.

A step whose last message was lost (a tenant dropped mid-step) may have updated one party's
halves and not the other's; their sum would then be no model at all. So both parties keep
the halves from before their last training steps and compare update counts at the start of
the next step: the party ahead returns to the point whose counts are the peer's.

Why two points, not one: a local truncation that fails (docs/mpc.md, about |v| * 2^-32 per
element of a product) inside a weight gradient puts ~2^32 into the halves, and no value the
same step opens shows it; the next step's openings do (the head output ``f`` and ``dL/dh``
the cloud opens, the logits ``z``). A step refused for an out-of-range opening therefore
undoes the step before it as well (:meth:`RollbackPoints.undo`, called by the cloud), and
the other party follows at its next step's reconcile.
"""

from __future__ import annotations

from typing import Any

from flower_split.protocol.messages import ProtocolError

ROLLBACK_DEPTH = 2
"""Training steps a party can undo: the one in flight or last finished, and the one before it."""

Snapshot = tuple[dict, dict, dict]  # (weights, buffers, updates) of ``Halves.snapshot``


class RollbackPoints:
    """At most :data:`ROLLBACK_DEPTH` snapshots of one party's halves, oldest first."""

    def __init__(self, points: list[Snapshot] | None = None) -> None:
        self.points: list[Snapshot] = list(points or [])[-ROLLBACK_DEPTH:]

    def __len__(self) -> int:
        return len(self.points)

    def push(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` (the halves before a training step); the oldest point beyond the depth goes."""
        self.points = [*self.points, snapshot][-ROLLBACK_DEPTH:]

    def clear(self) -> None:
        """Forget every point (the halves were replaced on both sides, e.g. by a sharing load)."""
        self.points = []

    def undo(self, halves: Any) -> bool:
        """Return ``halves`` to the newest point and drop it; False when there is none."""
        if not self.points:
            return False
        halves.restore(self.points.pop())
        return True

    def reconcile(self, halves: Any, peer_updates: object, who: str) -> None:
        """Bring ``halves`` to the peer's update counts ``peer_updates``: a party ahead returns
        to the point with the peer's counts; a party behind by at most :data:`ROLLBACK_DEPTH`
        steps waits for the peer to do so. ProtocolError when neither can (the model is lost)."""
        try:
            peer = {"head": int(peer_updates["head"]), "tail": int(peer_updates["tail"])}  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"{who}: peer update counts {peer_updates!r} are malformed") from None
        own = dict(halves.updates)
        if peer == own:
            return
        ahead = any(own[group] > peer[group] for group in peer)
        if ahead:
            for index in range(len(self.points) - 1, -1, -1):
                if dict(self.points[index][2]) == peer:
                    halves.restore(self.points[index])
                    del self.points[index:]
                    return
        elif all(0 <= peer[group] - own[group] <= ROLLBACK_DEPTH for group in peer):
            return  # the peer is ahead: it returns to these counts on its side
        raise ProtocolError(f"{who}: halves diverged beyond {ROLLBACK_DEPTH} steps (own updates {own}, peer "
                            f"{peer}); the tenant's model cannot be recovered")

    def export(self) -> list[dict[str, Any]]:
        """Plain data for a party's ``state_dict`` (live tensors: the caller copies if it must)."""
        return [{"weights": w, "buffers": b, "updates": u} for w, b, u in self.points]

    @classmethod
    def load(cls, state: dict[str, Any]) -> RollbackPoints:
        """The points of a party's saved ``state``: ``rollback``, or ``pre_step`` (one point) as
        saved before there were two."""
        if "rollback" in state:
            saved = state["rollback"] or []
        else:
            saved = [] if state.get("pre_step") is None else [state["pre_step"]]
        return cls([(dict(p["weights"]), dict(p["buffers"]), dict(p["updates"])) for p in saved])
