"""Typed byte envelopes for the two HE messages, validated on receipt.

Layout (little-endian)::

    magic "FSHE" | version u8 | kind u8 | key_id 16B | batch_size u32 | num_classes u32
    | num_ciphertexts u16 | sha256(everything else) 32B | body

* kind 1, ``LabelsMessage`` (client -> cloud): body = ``num_ciphertexts`` x (u32 length,
  seeded SEAL ciphertext) — Enc(onehot(y)).
* kind 2, ``ResultMessage`` (cloud -> client): body = sha256 of the labels envelope it
  answers (32B), then (u32 length, ciphertext) for Enc(loss) and for each of the
  ``num_ciphertexts`` gradient-share ciphertexts.

The digest (over the header fields and the body) catches truncated or garbled bytes
before SEAL parses anything (an integrity check, not authentication: the transport
authenticates the parties).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from flower_split.he.params import num_ciphertexts

MAGIC = b"FSHE"
VERSION = 1
KIND_LABELS = 1
KIND_RESULT = 2
_HEAD = struct.Struct("<4sBB16sIIH32s")
_FIELDS = struct.Struct("<4sBB16sIIH")  # the header without its digest
_LEN = struct.Struct("<I")
_MAX_BATCH = 1 << 20
_MAX_CLASSES = 1 << 16


def digest(data: bytes) -> bytes:
    """SHA-256 of an envelope; the result message quotes the labels envelope's digest."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class LabelsMessage:
    """Client -> cloud: a batch's one-hot labels under the tenant's key."""

    key_id: bytes
    batch_size: int
    num_classes: int
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class ResultMessage:
    """Cloud -> client: Enc(masked loss terms) and Enc(gradient share) for one labels message."""

    key_id: bytes
    batch_size: int
    num_classes: int
    request_digest: bytes
    loss_ciphertext: bytes
    grad_ciphertexts: tuple[bytes, ...]


def _sections(parts: tuple[bytes, ...]) -> bytes:
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def _encode(kind: int, key_id: bytes, batch_size: int, num_classes: int, count: int, body: bytes) -> bytes:
    fields = _FIELDS.pack(MAGIC, VERSION, kind, key_id, batch_size, num_classes, count)
    return fields + digest(fields + body) + body


def encode_labels(msg: LabelsMessage) -> bytes:
    body = _sections(msg.ciphertexts)
    return _encode(KIND_LABELS, msg.key_id, msg.batch_size, msg.num_classes, len(msg.ciphertexts), body)


def encode_result(msg: ResultMessage) -> bytes:
    body = msg.request_digest + _sections((msg.loss_ciphertext, *msg.grad_ciphertexts))
    return _encode(KIND_RESULT, msg.key_id, msg.batch_size, msg.num_classes, len(msg.grad_ciphertexts), body)


def _decode(data: bytes, kind: int, what: str, key_id: bytes, degree: int) -> tuple[int, int, int, bytes]:
    """Check the header and body digest; return (batch_size, num_classes, count, body)."""
    if len(data) < _HEAD.size:
        raise ValueError(f"{what}: truncated ({len(data)} bytes, header needs {_HEAD.size})")
    magic, version, got_kind, got_key, batch_size, num_classes, count, body_digest = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{what}: bad magic {magic!r} (not an HE envelope)")
    if version != VERSION:
        raise ValueError(f"{what}: unsupported version {version}")
    body = bytes(data[_HEAD.size :])
    if digest(bytes(data[: _FIELDS.size]) + body) != body_digest:
        raise ValueError(f"{what}: integrity check failed (bytes truncated or garbled)")
    if got_kind != kind:
        raise ValueError(f"{what}: wrong message kind {got_kind} (expected {kind})")
    if got_key != key_id:
        raise ValueError(
            f"{what}: key id {got_key.hex()} does not match this tenant's key {key_id.hex()} "
            "(ciphertext under another tenant's key, or under a rotated key)"
        )
    if not 1 <= batch_size <= _MAX_BATCH or not 2 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"{what}: implausible shape batch_size={batch_size}, num_classes={num_classes}")
    expected = num_ciphertexts(batch_size, num_classes, degree)
    if count != expected:
        raise ValueError(
            f"{what}: {count} ciphertexts, but a {batch_size}x{num_classes} batch needs {expected} "
            f"of {degree} coefficients"
        )
    return batch_size, num_classes, count, body


def _split(body: bytes, count: int, what: str) -> tuple[bytes, ...]:
    parts, offset = [], 0
    for _ in range(count):
        if offset + _LEN.size > len(body):
            raise ValueError(f"{what}: truncated ciphertext length")
        (size,) = _LEN.unpack_from(body, offset)
        offset += _LEN.size
        if offset + size > len(body):
            raise ValueError(f"{what}: truncated ciphertext")
        parts.append(body[offset : offset + size])
        offset += size
    if offset != len(body):
        raise ValueError(f"{what}: {len(body) - offset} unexpected trailing bytes")
    return tuple(parts)


def decode_labels(data: bytes, *, key_id: bytes, degree: int) -> LabelsMessage:
    """Parse and validate a labels envelope addressed to ``key_id``."""
    what = "labels envelope"
    batch_size, num_classes, count, body = _decode(data, KIND_LABELS, what, key_id, degree)
    return LabelsMessage(key_id, batch_size, num_classes, _split(body, count, what))


def decode_result(data: bytes, *, key_id: bytes, degree: int, request_digest: bytes) -> ResultMessage:
    """Parse and validate a result envelope answering the labels envelope ``request_digest``."""
    what = "result envelope"
    batch_size, num_classes, count, body = _decode(data, KIND_RESULT, what, key_id, degree)
    if body[:32] != request_digest:
        raise ValueError(f"{what}: answers a different labels envelope (request digest mismatch)")
    parts = _split(body[32:], count + 1, what)
    return ResultMessage(key_id, batch_size, num_classes, request_digest, parts[0], parts[1:])
