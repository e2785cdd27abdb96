"""Flower transport of the dealer node's messages: many tenants per message, errors per tenant.

The ServerApp talks to the dealer node three ways (docs/secure.md §9), each message
carrying every tenant concerned at once so that the dealer costs one round trip per stage,
whatever the number of tenants:

``query.dealer_hello``     ConfigRecord ``"dealer"`` {tenants} -> ``"dealer"`` {dealer-public,
                           identity, tenants, signatures}: one signed hello per tenant.
``query.dealer_register``  ``"dealer"`` {tenants, client-public, cloud-public, dims (4 per
                           tenant), train-head, tail-pooled} -> ``"outcome"`` {tenants, errors}.
``query.dealer_material``  ``"dealer"`` {tenants, steps, batches, tokens, train, rows} ->
                           ArrayRecord ``"material"`` (sealed bytes as uint8, by tenant) and
                           ``"outcome"`` {tenants, errors}.

An empty error string means success. Unpacking checks presence, types and equal list
lengths; the parties check the values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flower_split.flower.contract import RecordKey
from flower_split.flower.records import read_record, typed_value
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_messages import DealerHello, DealerRegistration, MaterialBundle, MaterialRequest

MAX_TENANTS_PER_MESSAGE = 4096


def _lists(record: ConfigRecord, fields: tuple[tuple[str, type], ...]) -> dict[str, list[Any]]:
    """Every field of ``record`` as a list of ``kind``, all of one length (the tenants')."""
    out: dict[str, list[Any]] = {}
    for name, kind in fields:
        values = typed_value(record, name, list, RecordKey.DEALER)
        if not all(isinstance(v, kind) and (kind is not int or not isinstance(v, bool)) for v in values):
            raise ProtocolError(f"{RecordKey.DEALER}.{name}: expected a list of {kind.__name__}")
        out[name] = list(values)
    count = len(out[fields[0][0]])
    if fields[0][0] == "tenants" and len(set(out["tenants"])) != count:
        raise ProtocolError(f"{RecordKey.DEALER}.tenants: duplicate tenant ids")
    if count > MAX_TENANTS_PER_MESSAGE:
        raise ProtocolError(f"{RecordKey.DEALER}: {count} tenants in one message, over {MAX_TENANTS_PER_MESSAGE}")
    for name, values in out.items():
        if len(values) != (4 if name == "dims" else 1) * count:
            raise ProtocolError(f"{RecordKey.DEALER}.{name}: {len(values)} values do not fit {count} tenants")
    return out


def pack_hello_request(tenants: list[str]) -> RecordDict:
    return RecordDict({RecordKey.DEALER: ConfigRecord({"tenants": list(tenants)})})


def unpack_hello_request(content: object) -> list[str]:
    return _lists(read_record(content, RecordKey.DEALER, ConfigRecord), (("tenants", str),))["tenants"]


def pack_hellos(hellos: list[DealerHello], identity: bytes) -> RecordDict:
    public = hellos[0].dealer_public if hellos else b""
    return RecordDict({RecordKey.DEALER: ConfigRecord({
        "dealer-public": public, "identity": identity, "tenants": [h.tenant for h in hellos],
        "signatures": [h.signature for h in hellos]})})


def unpack_hellos(content: object) -> dict[str, DealerHello]:
    record = read_record(content, RecordKey.DEALER, ConfigRecord)
    public = typed_value(record, "dealer-public", bytes, RecordKey.DEALER)
    lists = _lists(record, (("tenants", str), ("signatures", bytes)))
    return {t: DealerHello(public, t, sig) for t, sig in zip(lists["tenants"], lists["signatures"])}


_REGISTER = (("tenants", str), ("client-public", bytes), ("cloud-public", bytes), ("dims", int),
             ("train-head", bool), ("tail-pooled", bool))


def pack_registrations(registrations: list[DealerRegistration]) -> RecordDict:
    return RecordDict({RecordKey.DEALER: ConfigRecord({
        "tenants": [r.tenant for r in registrations], "client-public": [r.client_public for r in registrations],
        "cloud-public": [r.cloud_public for r in registrations],
        "dims": [int(v) for r in registrations for v in r.dims],
        "train-head": [bool(r.train_head) for r in registrations],
        "tail-pooled": [bool(r.tail_pooled) for r in registrations]})})


def unpack_registrations(content: object) -> list[DealerRegistration]:
    v = _lists(read_record(content, RecordKey.DEALER, ConfigRecord), _REGISTER)
    if len(v["dims"]) != 4 * len(v["tenants"]):
        raise ProtocolError(f"{RecordKey.DEALER}.dims: expected 4 per tenant")
    return [DealerRegistration(t, v["client-public"][i], v["cloud-public"][i], tuple(v["dims"][4 * i:4 * i + 4]),
                               v["train-head"][i], v["tail-pooled"][i]) for i, t in enumerate(v["tenants"])]


_REQUEST = (("tenants", str), ("steps", int), ("batches", int), ("tokens", int), ("train", bool), ("rows", int))


def pack_requests(requests: list[MaterialRequest]) -> RecordDict:
    return RecordDict({RecordKey.DEALER: ConfigRecord({
        "tenants": [r.tenant for r in requests], "steps": [r.step for r in requests],
        "batches": [r.batch for r in requests], "tokens": [r.tokens for r in requests],
        "train": [bool(r.train) for r in requests], "rows": [r.rows for r in requests]})})


def unpack_requests(content: object) -> list[MaterialRequest]:
    v = _lists(read_record(content, RecordKey.DEALER, ConfigRecord), _REQUEST)
    return [MaterialRequest(t, v["steps"][i], v["batches"][i], v["tokens"][i], v["train"][i], v["rows"][i])
            for i, t in enumerate(v["tenants"])]


def pack_outcome(errors: dict[str, str], content: RecordDict | None = None) -> RecordDict:
    """``errors`` by tenant ("" for success) into ``content``."""
    content = RecordDict() if content is None else content
    content[RecordKey.OUTCOME] = ConfigRecord({"tenants": list(errors), "errors": list(errors.values())})
    return content


def unpack_outcome(content: object) -> dict[str, str]:
    lists = _lists(read_record(content, RecordKey.OUTCOME, ConfigRecord), (("tenants", str), ("errors", str)))
    return dict(zip(lists["tenants"], lists["errors"]))


def pack_bundles(bundles: list[MaterialBundle], errors: dict[str, str]) -> RecordDict:
    material = ArrayRecord({b.tenant: Array(np.frombuffer(b.sealed, dtype=np.uint8)) for b in bundles})
    return pack_outcome(errors, RecordDict({RecordKey.MATERIAL: material}))


def unpack_bundles(content: object, steps: dict[str, int]) -> dict[str, MaterialBundle | str]:
    """Each requested tenant's bundle (for the step asked), or the dealer's error for it."""
    errors = unpack_outcome(content)
    material = read_record(content, RecordKey.MATERIAL, ArrayRecord)
    out: dict[str, MaterialBundle | str] = {}
    for tenant, step in steps.items():
        if errors.get(tenant):
            out[tenant] = errors[tenant]
        elif tenant not in material:
            out[tenant] = "the dealer sent no material"
        else:
            array = material[tenant]
            try:
                if array.dtype != "uint8" or len(array.shape) != 1:
                    raise ValueError(f"expected a flat uint8 array, got {array.dtype} {array.shape}")
                out[tenant] = MaterialBundle(tenant, step, array.numpy().tobytes())
            except (TypeError, ValueError) as exc:
                out[tenant] = f"material: {exc}"
    return out
