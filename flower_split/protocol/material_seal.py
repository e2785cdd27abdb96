"""The dealer's material to the cloud, sealed so that only the cloud opens it.

Over Flower the dealer's :class:`MaterialBundle` travels dealer node -> SuperLink ->
ServerApp. The corrections are the cloud's own shares (``c - c_client + t_cloud``), so the
cloud may read them, but nobody on the way may (a SuperLink run by another operator, a
log): they are sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the 32-byte
key the dealer and the cloud agreed for the tenant (``secure_keys.dealer_key``, role
"cloud"). The nonce is derived from the step number and the step's shape
(``StepSpec.material_label``): the dealer serves a step number at most once per tenant, and
even two servings of one number (a race between two dealer processes on one state) differ
in nonce unless they are for the same shape, when they are the same bytes. The additional
data binds tenant, step and shape, so a bundle cannot be replayed for another step, shape
or tenant. Nothing of the client's material travels at all (it derives it from its
own dealer key).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flower_split.protocol.messages import ProtocolError

_INFO = b"flower-split/secure/material-seal/v1"
TAG_BYTES = 16


def seal_key(dealer_cloud_key: bytes) -> bytes:
    """The AES-256-GCM key of one tenant's material, from the dealer-cloud key."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(dealer_cloud_key)


def _nonce_and_aad(tenant: str, step: int, shape: bytes) -> tuple[bytes, bytes]:
    name = tenant.encode()
    aad = b"".join((_INFO, struct.pack(">I", len(name)), name, struct.pack(">Q", step), shape))
    return hashlib.sha256(b"nonce" + struct.pack(">Q", step) + shape).digest()[:12], aad


def seal(key: bytes, tenant: str, step: int, shape: bytes, tensors: list[torch.Tensor]) -> bytes:
    """The int64 ``tensors``, concatenated in order and sealed (``shape``: the step's material label)."""
    plain = b"".join(t.detach().cpu().contiguous().numpy().astype("<i8", copy=False).tobytes() for t in tensors)
    nonce, aad = _nonce_and_aad(tenant, step, shape)
    return AESGCM(key).encrypt(nonce, plain, aad)


def open_sealed(key: bytes, tenant: str, step: int, shape: bytes, sealed: bytes,
                shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The tensors of ``shapes`` from ``sealed``; ProtocolError if it is forged, replayed or the wrong size."""
    if not isinstance(sealed, bytes):
        raise ProtocolError(f"material: expected sealed bytes, got {type(sealed).__name__}")
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    if len(sealed) != 8 * sum(sizes) + TAG_BYTES:
        raise ProtocolError(f"material for step {step}: {len(sealed)} bytes, expected {8 * sum(sizes) + TAG_BYTES}")
    nonce, aad = _nonce_and_aad(tenant, step, shape)
    try:
        plain = AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise ProtocolError(f"material for step {step} of tenant {tenant!r}: does not authenticate "
                            "(not sealed by this tenant's dealer for this step)") from None
    flat = torch.from_numpy(np.frombuffer(plain, dtype="<i8").astype(np.int64))
    out, offset = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return out
