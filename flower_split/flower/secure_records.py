"""Flower transport of the secure protocol: its messages <-> Flower ``RecordDict``.

A secure step message (:class:`SecureMessage`) travels alone: a tenant has at most one
secure step in flight (both halves change at its end), so there is nothing to pack. Layout:

``"secure"`` (:class:`ConfigRecord`)
    ``format``, ``kind`` ("SecureMessage"), ``tenant``, ``step``, ``seq``, ``sender``,
    ``stage``, ``train``, ``batch``, ``tokens``, ``frac-bits``, ``rows``, and the item names:
    ``tensors`` (list of str) and ``blobs`` (list of str).
``"payload"`` (:class:`ArrayRecord`)
    one int64 array per tensor item (ring shares, the attention mask), keyed by item name.
``"blobs"`` (:class:`ConfigRecord`)
    one ``bytes`` value per byte item (seeds, CKKS envelopes), keyed by item name.

Set-up messages: :class:`DealerHello` as ConfigRecord ``"hello"`` {dealer-public, tenant,
signature} and
:class:`ClientSetup` as ConfigRecord ``"setup"`` (its fields; ``optim`` as JSON).
Key rotation (``he``): :class:`KeyRotation` as ConfigRecord ``"rekey"`` {tenant,
previous-key-id, key-id, he-public}; the cloud's current CKKS key id travels as
``he-key-id`` (bytes) in the server's ``config`` of ``secure_begin`` and ``secure_rekey``.

Unpacking checks the records' presence and types and rebuilds the dataclass; whether its
contents fit the step (names, shapes, dtypes, schedule position) is the receiving party's
check (:mod:`flower_split.protocol.secure_messages`), done before any state changes.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flower_split.flower.contract import RecordKey
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_messages import ClientSetup, DealerHello, KeyRotation, SecureMessage
from flower_split.flower.records import (
    PACK_FORMAT, PAYLOAD_KEY, array_to_tensor, read_record, tensor_to_array, typed_value,
)

SECURE_KEY = RecordKey.SECURE
BLOBS_KEY = RecordKey.BLOBS
HELLO_KEY = RecordKey.HELLO
SETUP_KEY = RecordKey.SETUP
REKEY_KEY = RecordKey.REKEY

_HEADER: tuple[tuple[str, str, type], ...] = (
    ("tenant", "tenant", str), ("step", "step", int), ("seq", "seq", int), ("sender", "sender", str),
    ("stage", "stage", str), ("train", "train", bool), ("batch", "batch", int), ("tokens", "tokens", int),
    ("frac_bits", "frac-bits", int), ("rows", "rows", int),
)


def _names(record: ConfigRecord, key: str) -> list[str]:
    values = typed_value(record, key, list, SECURE_KEY)
    if not all(isinstance(v, str) and v for v in values) or len(set(values)) != len(values):
        raise ProtocolError(f"{SECURE_KEY}.{key}: expected distinct item names, got {values!r}")
    return list(values)


def pack_secure(message: SecureMessage, content: RecordDict | None = None) -> RecordDict:
    """A secure step message as a RecordDict (added to ``content`` when given)."""
    content = RecordDict() if content is None else content
    tensors = {k: v for k, v in message.items.items() if isinstance(v, torch.Tensor)}
    blobs = {k: v for k, v in message.items.items() if isinstance(v, bytes)}
    if len(tensors) + len(blobs) != len(message.items):
        odd = sorted(set(message.items) - set(tensors) - set(blobs))
        raise ProtocolError(f"items {odd}: only tensors and bytes can travel")
    header: dict[str, Any] = {"format": PACK_FORMAT, "kind": "SecureMessage"}
    header.update({wire: getattr(message, attr) for attr, wire, _ in _HEADER})
    header.update(tensors=sorted(tensors), blobs=sorted(blobs))
    content[SECURE_KEY] = ConfigRecord(header)
    content[PAYLOAD_KEY] = ArrayRecord({k: tensor_to_array(f"item {k!r}", v) for k, v in tensors.items()})
    content[BLOBS_KEY] = ConfigRecord(blobs)
    return content


def has_secure(content: RecordDict) -> bool:
    """Whether ``content`` carries a secure step message."""
    return isinstance(content, RecordDict) and SECURE_KEY in content


def unpack_secure(content: object, tenant: str, sender: str) -> SecureMessage:
    """The secure step message in ``content``, from ``sender`` for ``tenant`` (ProtocolError if not)."""
    header = read_record(content, SECURE_KEY, ConfigRecord)
    if typed_value(header, "format", int, SECURE_KEY) != PACK_FORMAT:
        raise ProtocolError(f"{SECURE_KEY}.format: unsupported version {header['format']!r}")
    if typed_value(header, "kind", str, SECURE_KEY) != "SecureMessage":
        raise ProtocolError(f"{SECURE_KEY}.kind: expected 'SecureMessage', got {header['kind']!r}")
    fields = {attr: typed_value(header, wire, kind, SECURE_KEY) for attr, wire, kind in _HEADER}
    if fields["tenant"] != tenant:
        raise ProtocolError(f"message for tenant {fields['tenant']!r} delivered to {tenant!r}")
    if fields["sender"] != sender:
        raise ProtocolError(f"{SECURE_KEY}.sender: expected {sender!r}, got {fields['sender']!r}")
    tensor_names, blob_names = _names(header, "tensors"), _names(header, "blobs")
    payload = read_record(content, PAYLOAD_KEY, ArrayRecord)
    blobs = read_record(content, BLOBS_KEY, ConfigRecord)
    if set(payload.keys()) != set(tensor_names) or set(blobs.keys()) != set(blob_names):
        raise ProtocolError(f"items do not match the header: arrays {sorted(payload.keys())} vs {tensor_names}, "
                            f"blobs {sorted(blobs.keys())} vs {blob_names}")
    items: dict[str, Any] = {k: array_to_tensor(f"item {k!r}", payload[k]) for k in tensor_names}
    items.update({k: typed_value(blobs, k, bytes, BLOBS_KEY) for k in blob_names})
    return SecureMessage(items=items, **fields)


def pack_hello(hello: DealerHello) -> RecordDict:
    return RecordDict({HELLO_KEY: ConfigRecord({"dealer-public": hello.dealer_public, "tenant": hello.tenant,
                                                "signature": hello.signature})})


def unpack_hello(content: object) -> DealerHello:
    record = read_record(content, HELLO_KEY, ConfigRecord)
    return DealerHello(typed_value(record, "dealer-public", bytes, HELLO_KEY),
                       typed_value(record, "tenant", str, HELLO_KEY), typed_value(record, "signature", bytes, HELLO_KEY))


_SETUP_FIELDS: tuple[tuple[str, type], ...] = (
    ("tenant", str), ("client_public", bytes), ("dealer_public", bytes), ("he_public", bytes),
    ("weights_seed", bytes), ("label_protection", str), ("train_head", bool), ("frac_bits", int),
    ("grad_scale_bits", int), ("tail_input", str), ("reproducible_init", bool),
)


def pack_setup(setup: ClientSetup) -> RecordDict:
    values: dict[str, Any] = {name.replace("_", "-"): getattr(setup, name) for name, _ in _SETUP_FIELDS}
    values["dims"] = [int(v) for v in setup.dims]
    values["optim"] = json.dumps(setup.optim)
    return RecordDict({SETUP_KEY: ConfigRecord(values)})


def unpack_setup(content: object) -> ClientSetup:
    """The client's set-up message (field types checked; the cloud validates the values)."""
    record = read_record(content, SETUP_KEY, ConfigRecord)
    fields = {name: typed_value(record, name.replace("_", "-"), kind, SETUP_KEY) for name, kind in _SETUP_FIELDS}
    dims = typed_value(record, "dims", list, SETUP_KEY)
    if len(dims) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in dims):
        raise ProtocolError(f"{SETUP_KEY}.dims: expected 4 integers, got {dims!r}")
    try:
        optim = json.loads(typed_value(record, "optim", str, SETUP_KEY))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{SETUP_KEY}.optim: not JSON ({exc})") from None
    if not isinstance(optim, dict):
        raise ProtocolError(f"{SETUP_KEY}.optim: expected an object, got {optim!r}")
    return ClientSetup(dims=tuple(dims), optim=optim, **fields)


_REKEY_FIELDS: tuple[tuple[str, type], ...] = (
    ("tenant", str), ("previous_key_id", bytes), ("key_id", bytes), ("he_public", bytes),
)


def pack_key_rotation(rotation: KeyRotation) -> RecordDict:
    """A tenant's key rotation (its new public context) as the reply to ``train.secure_rekey``."""
    values = {name.replace("_", "-"): getattr(rotation, name) for name, _ in _REKEY_FIELDS}
    return RecordDict({REKEY_KEY: ConfigRecord(values)})


def unpack_key_rotation(content: object, tenant: str) -> KeyRotation:
    """``tenant``'s key rotation (field types checked; the cloud validates the key material)."""
    record = read_record(content, REKEY_KEY, ConfigRecord)
    fields = {name: typed_value(record, name.replace("_", "-"), kind, REKEY_KEY) for name, kind in _REKEY_FIELDS}
    if fields["tenant"] != tenant:
        raise ProtocolError(f"{REKEY_KEY}.tenant: {fields['tenant']!r}, but the node serves tenant {tenant!r}")
    return KeyRotation(**fields)
