"""What the secure cloud keeps per tenant, and its plain-data export for saved state.

One :class:`CloudTenant` per set-up tenant: its public set-up, the cloud's weight halves and
momentum, its public CKKS context (``he``) with a pool of loss randomness made ahead under it
(:class:`~flower_split.he.material.MaterialPool`, never saved), the cloud's dealer key for it, the next step
number it accepts, the step in flight (with the halves from before it, for reconcile), and
Beaver material: for the step whose first message arrived (``material``) and for the
tenant's next training step asked ahead of it (``prefetched``, docs/secure.md §9).
"""

from __future__ import annotations

from typing import Any

import torch

from flower_split.he import CloudKeys
from flower_split.he.material import MaterialPool
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_messages import MAX_STEP, ClientSetup
from flower_split.protocol.secure_party import Halves, StepState
from flower_split.protocol.secure_rollback import RollbackPoints
from flower_split.protocol.secure_step_io import export_step, export_value, import_step, import_value
from flower_split.protocol.secure_steps import StepSpec

Material = tuple[StepSpec, dict[str, torch.Tensor] | None]  # spec, and its corrections once dealt


class CloudTenant:
    """The cloud's record of one tenant."""

    def __init__(self, setup: ClientSetup, halves: Halves, he_keys: CloudKeys | None, key: bytes) -> None:
        self.setup = setup
        self.halves = halves
        self.he_keys = he_keys  # also sets he_material
        self.key = key
        self.next_step = 0
        self.step: StepState | None = None
        self.rollback = RollbackPoints()  # halves before the last training steps (for reconcile)
        self.material: Material | None = None
        self.prefetched: Material | None = None
        # a sharing load sent whose acknowledgement has not come: (its number, the cloud's means)
        self.pending_load: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def he_keys(self) -> CloudKeys | None:
        """The tenant's public CKKS context (``he``), or None."""
        return self._he_keys

    @he_keys.setter
    def he_keys(self, keys: CloudKeys | None) -> None:
        """Set the context and a fresh pool of loss material under it (never saved; a rotated
        key gets a new pool, so no material encrypted under the old key is used)."""
        self._he_keys = keys
        self.he_material = MaterialPool(keys) if keys is not None else None

    def skip(self, gap: int) -> None:
        """Move the next step ``gap`` numbers on and drop material dealt ahead (a restarted cloud:
        the tenant and the dealer may have used numbers after its save; none is used twice)."""
        if self.next_step + gap >= MAX_STEP:
            raise ProtocolError(f"step numbers exhausted: {self.next_step} + {gap} >= 2^62")
        self.next_step += gap
        self.prefetched = None

    def ahead(self) -> tuple[int, int, int, int] | None:
        """(step, batch, tokens, rows) of the training step whose material the cloud asked ahead of its
        first message (None: none). Every begin instruction carries it: a tenant whose step of
        that number cannot use it moves past the number, which the dealer has spent. Material
        whose reply was lost or refused is (step, 0, 0, 0), a shape no batch has: the dealer may
        have dealt the number all the same, so every tenant step moves past it."""
        if self.prefetched is None:
            return None
        spec = self.prefetched[0]
        return (spec.step, spec.batch, spec.tokens, spec.rows) if self.prefetched[1] is not None \
            else (spec.step, 0, 0, 0)

    def abort(self, undo_previous: bool = False) -> bool:
        """Abandon the step in flight (if any), undoing any update it made. ``undo_previous``: undo
        the training step before it too, because a value opened in this step was out of range (a
        failed truncation in that step's weight gradients shows only now,
        :mod:`~flower_split.protocol.secure_rollback`). False when that found no rollback point left."""
        if self.step is not None and self.step.spec.train:
            self.rollback.undo(self.halves)
        undone = self.rollback.undo(self.halves) if undo_previous else True
        self.step, self.material = None, None
        return undone

    def offer_load(self, means: dict[str, torch.Tensor]) -> int:
        """A sharing load is about to be sent: keep the cloud's ``means`` until the tenant's count
        says whether it loaded (:meth:`settle_load`); returns the load's number."""
        self.pending_load = (self.halves.loads + 1, dict(means))  # never written in place: shared, not copied
        return self.pending_load[0]

    def settle_load(self, tenant_loads: int, who: str = "cloud") -> None:
        """Match the tenant's count of sharing loads: equal drops a pending load (the tenant did
        not load it), one more completes it here (its acknowledgement was lost). Anything else
        cannot be matched: a ProtocolError, and the tenant's model is lost."""
        if tenant_loads == self.halves.loads:
            self.pending_load = None
            return
        if self.pending_load is not None and tenant_loads == self.pending_load[0] == self.halves.loads + 1:
            self.halves.replace(self.pending_load[1])
            self.rollback.clear()  # as the tenant did at its load: the last step is over on both sides
            self.pending_load = None
            return
        raise ProtocolError(f"{who}: the tenant made {tenant_loads} sharing loads, the cloud's halves {self.halves.loads}"
                            f"{' (one pending)' if self.pending_load is not None else ''}: the halves cannot be "
                            "matched and the tenant's model is lost")

    def export(self) -> dict[str, Any]:
        """Plain data (tensors, bytes, numbers) for ``state_dict``."""
        return {
            "setup": dict(vars(self.setup)), "halves": self.halves.state_dict(),
            "he_keys": self.he_keys.to_bytes() if self.he_keys is not None else None,
            "key": self.key, "next_step": self.next_step,
            "rollback": self.rollback.export(),
            "step": export_step(self.step) if self.step is not None else None,
            "material": _export_material(self.material), "prefetched": _export_material(self.prefetched),
            "pending_load": None if self.pending_load is None else
            {"number": self.pending_load[0], "means": self.pending_load[1]},
        }

    @classmethod
    def load(cls, state: dict[str, Any], party: int) -> "CloudTenant":
        """Inverse of :meth:`export`."""
        record = cls(ClientSetup(**state["setup"]), Halves.from_state(party, state["halves"]),
                     CloudKeys.from_bytes(state["he_keys"]) if state["he_keys"] is not None else None, state["key"])
        record.next_step = int(state["next_step"])
        record.rollback = RollbackPoints.load(state)
        record.step = import_step(state["step"]) if state["step"] is not None else None
        record.material = _import_material(state["material"])
        record.prefetched = _import_material(state.get("prefetched"))
        pending = state.get("pending_load")  # absent in a state saved before loads were counted
        record.pending_load = None if pending is None else (int(pending["number"]), dict(pending["means"]))
        return record


def _export_material(material: Material | None) -> dict[str, Any] | None:
    return None if material is None else {"spec": dict(vars(material[0])), "corrections": export_value(material[1])}


def _import_material(data: dict[str, Any] | None) -> Material | None:
    return None if data is None else (StepSpec(**data["spec"]), import_value(data["corrections"]))
