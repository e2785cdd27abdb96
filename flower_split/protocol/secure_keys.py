"""Key agreement with the dealer and the seed-derived randomness of the secure protocol.

Dealer material (docs/secure.md, "Dealer"): the dealer and each party agree on a 32-byte
key with X25519 (the party's and the dealer's public keys travel in the clear, through
the cloud for a client; the cloud cannot compute the shared secret) and HKDF-SHA256.
Every Beaver seed of that party is then ``HMAC-SHA256(key, label)`` with a label that
names tenant, step, program and product index, so **no per-triple seed travels at all**:
the client derives its own material, the cloud derives its own, and only the dealer knows
both. HMAC-SHA256 is a PRF, so the seeds are pseudo-random and independent to anyone
without the key (in particular to the cloud, for the client's seeds).

Shares sent as seeds: a party that splits a value ``v`` it knows can send the other party
a fresh 32-byte seed and keep ``v - PRG(seed)``; the receiver's share ``PRG(seed)``
(AES-256-CTR, :class:`flower_split.mpc.RingStream`) is independent of ``v``. This is how
``e``, ``h``, ``g`` (client mode), ``dL/df`` and the initial weight halves are shared:
32 bytes instead of a tensor.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flower_split.mpc import SEED_BYTES, RingStream

PUBLIC_KEY_BYTES = 32
_KDF_INFO = b"flower-split/secure/dealer-key/v1"
_SEED_LABEL = b"flower-split/secure/beaver-seed/v2"


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 key pair (OS entropy)."""
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    if not isinstance(data, bytes) or len(data) != 32:
        raise ValueError("X25519 private key must be 32 bytes")
    return X25519PrivateKey.from_private_bytes(data)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_public_key(data: object, what: str) -> bytes:
    """Return ``data`` if it is a valid 32-byte X25519 public key, else raise ValueError.

    A low-order point (all-zero shared secret with any key) is refused here by a trial
    exchange with a throw-away key, so it fails at the first party that sees it, not later
    inside the dealer.
    """
    if not isinstance(data, bytes) or len(data) != PUBLIC_KEY_BYTES:
        raise ValueError(f"{what}: expected a {PUBLIC_KEY_BYTES}-byte X25519 public key")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(data))
    except ValueError:
        raise ValueError(f"{what}: a low-order X25519 point (no shared secret)") from None
    return data


def dealer_key(own: X25519PrivateKey, peer_public: bytes, role: str, tenant: str,
               dealer_public: bytes, party_public: bytes) -> bytes:
    """The 32-byte key one party ("client" or "cloud") shares with the dealer for ``tenant``.

    Both ends compute it: the party with its private key and the dealer's public key, the
    dealer with its private key and the party's public key. HKDF binds the role, the
    tenant and both public keys, so keys for different tenants or roles are independent.
    """
    if role not in ("client", "cloud"):
        raise ValueError(f"role must be 'client' or 'cloud', got {role!r}")
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"|".join((_KDF_INFO, role.encode(), tenant.encode(), dealer_public, party_public))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def beaver_seed(key: bytes, tenant: str, step: int, program: str, index: int, shape: bytes) -> bytes:
    """Seed of product ``index`` of ``program`` in ``step``: HMAC-SHA256(key, label).

    ``shape``: the step's ``StepSpec.material_label()``; the label binds it with tenant, step,
    program and index (length-prefixed), so no two products of any two steps or shapes share
    a seed.
    """
    name, prog = tenant.encode(), program.encode()
    label = b"".join((_SEED_LABEL, struct.pack(">I", len(name)), name, struct.pack(">QI", step, index),
                      struct.pack(">I", len(prog)), prog, shape))
    return hmac.new(key, label, hashlib.sha256).digest()


def prg(seed: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform ring tensor of ``shape`` expanded from ``seed`` (AES-256-CTR)."""
    return RingStream(seed).next(shape)


def prg_many(seed: bytes, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Several uniform ring tensors from one seed, drawn in order."""
    stream = RingStream(seed)
    return [stream.next(shape) for shape in shapes]
