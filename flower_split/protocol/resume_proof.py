"""Proof of possession for a resumed tenant: the node that claims it holds the tenant's key.

A cloud resumed from its checkpoint holds each tenant's halves but not the Flower node it
was bound to (node ids may change across restarts). Binding the first node that claims the
tenant id would let any registered node take a tenant's halves over and ruin its model. So
the cloud challenges every claimant with a fresh ephemeral X25519 key and nonce; the real
tenant answers with an HMAC under the X25519 secret of that key and the tenant's own key,
whose public half the cloud holds from the set-up (``ClientSetup.client_public``). Only the
holder of the tenant's private key can answer; a fresh challenge per claim means a recorded
answer is worth nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flower_split.protocol.secure_keys import check_public_key, public_bytes

NONCE_BYTES = 32
_INFO = b"flower-split resume proof v1"


def challenge() -> tuple[X25519PrivateKey, bytes, bytes]:
    """(ephemeral private key, its public bytes, nonce) for one claim."""
    ephemeral = X25519PrivateKey.generate()
    return ephemeral, public_bytes(ephemeral), secrets.token_bytes(NONCE_BYTES)


def prove(own: X25519PrivateKey, ephemeral_public: object, nonce: object, tenant: str) -> bytes:
    """The tenant's answer; ValueError on a malformed challenge."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"resume challenge: expected a {NONCE_BYTES}-byte nonce")
    peer = check_public_key(ephemeral_public, "resume challenge")
    return _tag(own.exchange(X25519PublicKey.from_public_bytes(peer)), peer, public_bytes(own), nonce, tenant)


def verify(ephemeral: X25519PrivateKey, client_public: bytes, nonce: bytes, tenant: str, proof: object) -> bool:
    """Whether ``proof`` answers the challenge for the tenant whose key is ``client_public``."""
    if not isinstance(proof, bytes):
        return False
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(client_public))
    return hmac.compare_digest(_tag(shared, public_bytes(ephemeral), client_public, nonce, tenant), proof)


def _tag(shared: bytes, ephemeral_public: bytes, client_public: bytes, nonce: bytes, tenant: str) -> bytes:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"|".join((_INFO, tenant.encode(), ephemeral_public, client_public))).derive(shared)
    return hmac.new(key, nonce, hashlib.sha256).digest()
