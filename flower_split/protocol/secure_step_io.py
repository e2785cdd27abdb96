"""One party's step state as plain data: export between two messages, import on the next.

Flower keeps a party's state between messages in ``Context.state`` (tensors, bytes and plain
values), so a :class:`~flower_split.protocol.secure_party.StepState` is exported with
:func:`export_step` and rebuilt with :func:`import_step`; ``ctx`` keys starting with ``_``
are caches and are not exported. A ``PartyState`` travels with its values, its scope, its
mask records (``mpc.masks``: mask share, fractional bits, both parts of the opening; a
reused mask needs them in a later message) and its pending products.
"""

from __future__ import annotations

from typing import Any

import torch

from flower_split.mpc import AdditiveShare, MaskRecord, PartyState
from flower_split.mpc.beaver import LEFT, RIGHT, SHARED, PendingProduct
from flower_split.mpc.triples import SquarePair, Triple, TripleRequest
from flower_split.protocol.secure_party import StepState
from flower_split.protocol.secure_steps import StepSpec


def export_value(value: Any, copy: bool = True) -> Any:
    """Plain (tensors, bytes, scalars, dicts, lists) form of a step value; with ``copy=False`` its
    tensors are the live ones (for a caller that serializes them at once and keeps nothing)."""
    if isinstance(value, PartyState):
        pending = None
        if value.pending is not None:
            pending = {"stage": value.pending[0], "products": [_export_pending(p, copy) for p in value.pending[1]]}
        return {"__party_state__": value.party, "scope": value.scope,
                "values": {k: {"data": _copy(v.data, copy), "frac_bits": v.frac_bits}
                           for k, v in value.values.items()},
                "masks": {k: _export_mask(m, copy) for k, m in value.masks.items()},
                "pending": pending}
    if isinstance(value, torch.Tensor):
        return _copy(value.detach().cpu(), copy)
    if isinstance(value, dict):
        return {k: export_value(v, copy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [export_value(v, copy) for v in value]
    return value


def _copy(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    return tensor.contiguous().clone() if copy else tensor


def import_value(value: Any) -> Any:
    """Inverse of :func:`export_value`."""
    if isinstance(value, dict) and "__party_state__" in value:
        party = value["__party_state__"]
        values = {k: AdditiveShare(v["data"], party, v["frac_bits"]) for k, v in value["values"].items()}
        pending = None
        if value["pending"] is not None:
            pending = (value["pending"]["stage"], [_import_pending(p) for p in value["pending"]["products"]])
        masks = {k: _import_mask(m) for k, m in value["masks"].items()}
        return PartyState(party, values, pending, value["scope"], masks)
    if isinstance(value, dict):
        return {k: import_value(v) for k, v in value.items()}
    return value


def _export_mask(m: MaskRecord, copy: bool) -> dict[str, Any]:
    return {"shape": list(m.shape), "share": _copy(m.share, copy), "frac_bits": m.frac_bits,
            "sent": _copy(m.sent, copy), "received": None if m.received is None else _copy(m.received, copy)}


def _import_mask(d: dict[str, Any]) -> MaskRecord:
    if "frac_bits" not in d:  # saved before records were bound by sent + share (a BLAKE2b digest)
        raise ValueError("a mid-step mask record saved by an older flower-split (a digest, no frac_bits): "
                         "resume that step with the version that saved it")
    return MaskRecord(tuple(d["shape"]), d["share"], d["frac_bits"], d["sent"], d["received"])


def _export_pending(p: PendingProduct, copy: bool) -> dict[str, Any]:
    material = p.material
    tensors = {"a": material.a, "c": material.c}
    if isinstance(material, Triple):
        tensors["b"] = material.b
    return {"op": p.request.op.value, "x_shape": list(p.request.x_shape),
            "y_shape": None if p.request.y_shape is None else list(p.request.y_shape),
            "party": p.party, "out_frac_bits": p.out_frac_bits, "truncate_bits": p.truncate_bits,
            "x": _copy(p.x, copy), "sent": [_copy(t, copy) for t in p.sent],
            "material": {k: _copy(v, copy) for k, v in tensors.items()},
            "y": None if p.y is None else _copy(p.y, copy), "form": p.form, "holder": p.holder}


def _import_pending(d: dict[str, Any]) -> PendingProduct:
    request = TripleRequest(d["op"], tuple(d["x_shape"]), None if d["y_shape"] is None else tuple(d["y_shape"]))
    m = d["material"]
    material = Triple(m["a"], m["b"], m["c"]) if "b" in m else SquarePair(m["a"], m["c"])
    form, holder = d.get("form", SHARED), d.get("holder")  # absent: a shared product
    if form not in (SHARED, LEFT, RIGHT) or holder not in ((None,) if form == SHARED else (0, 1)):
        raise ValueError(f"a pending product's form {form!r} / holder {holder!r} is not valid")
    return PendingProduct(request, d["party"], d["out_frac_bits"], d["truncate_bits"], d["x"],
                          tuple(d["sent"]), material, d.get("y"), form, holder)


def export_step(st: StepState, copy: bool = True) -> dict[str, Any]:
    return {"spec": dict(vars(st.spec)), "pc": st.pc, "seq": st.seq, "inbox": export_value(st.inbox, copy),
            "ctx": {k: export_value(v, copy) for k, v in st.ctx.items() if not k.startswith("_")}}


def import_step(state: dict[str, Any]) -> StepState:
    return StepState(StepSpec(**state["spec"]), int(state["pc"]), int(state["seq"]),
                     import_value(state["inbox"]), {k: import_value(v) for k, v in state["ctx"].items()})
