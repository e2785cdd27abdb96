"""The dealer's long-term identity: an Ed25519 key the tenants pin, and the hello it signs.

Why: the dealer's X25519 session key reaches a tenant through the cloud. A cloud that could
swap it for its own key would agree the tenant's dealer key itself, derive every Beaver
seed of the tenant and open everything the tenant sends. So the dealer signs, per tenant,
``CONTEXT | len(tenant) | tenant | session key`` with a long-term key whose public half the
tenant pins (node config ``dealer-public-key``, a file or a hex string; docs/secure.md §2),
and the tenant refuses a hello that is unsigned, signed by another key, or signed for
another tenant.

Files: :func:`save_identity` writes the private key (PKCS#8 PEM, mode 0600) and the public
key (raw, hex) atomically; :func:`load_identity` / :func:`load_pinned` read them with
errors that name the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_messages import DealerHello
from flower_split.state.store import write_atomic

IDENTITY_BYTES = 32
SIGNATURE_BYTES = 64
_HELLO_CONTEXT = b"flower-split/dealer-hello/v1"
PRIVATE_FILE, PUBLIC_FILE = "dealer.key", "dealer.pub"


def new_identity() -> Ed25519PrivateKey:
    """A fresh long-term dealer key (OS entropy)."""
    return Ed25519PrivateKey.generate()


def identity_public(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes a tenant pins."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hello_bytes(tenant: str, session_public: bytes) -> bytes:
    name = tenant.encode()
    return b"|".join((_HELLO_CONTEXT, struct.pack(">I", len(name)) + name, session_public))


def signed_hello(key: Ed25519PrivateKey, tenant: str, session_public: bytes) -> DealerHello:
    """The hello for ``tenant``: the session key, signed together with the tenant id."""
    return DealerHello(session_public, tenant, key.sign(_hello_bytes(tenant, session_public)))


def verify_hello(pinned: bytes, hello: DealerHello, tenant: str) -> None:
    """Raise ProtocolError unless ``hello`` is signed for ``tenant`` by the pinned dealer key."""
    if not isinstance(hello.signature, bytes) or len(hello.signature) != SIGNATURE_BYTES:
        raise ProtocolError("dealer hello: unsigned (a tenant only accepts a hello signed by its pinned dealer key)")
    if hello.tenant != tenant:
        raise ProtocolError(f"dealer hello: signed for tenant {hello.tenant!r}, not for {tenant!r}")
    if not isinstance(hello.dealer_public, bytes):
        raise ProtocolError("dealer hello: dealer_public must be bytes")
    try:
        Ed25519PublicKey.from_public_bytes(pinned).verify(hello.signature, _hello_bytes(tenant, hello.dealer_public))
    except InvalidSignature:
        raise ProtocolError("dealer hello: the signature does not verify under the pinned dealer key "
                            "(another dealer, or a key swapped on the way)") from None


def accept_hello(hello: DealerHello, tenant: str, pinned: bytes | None, allow_unpinned: bool) -> None:
    """A tenant's check of its dealer's hello: signed for ``tenant`` by the ``pinned`` key.

    No pinned key is refused unless ``allow_unpinned`` (a dealer co-located with the cloud,
    tests and demos only: then the cloud can be the dealer and open everything).
    """
    if pinned is not None:
        verify_hello(pinned, hello, tenant)
    elif not allow_unpinned:
        raise ProtocolError(f"tenant {tenant!r}: no pinned dealer key, so the dealer's hello cannot be verified "
                            "(set the node config dealer-public-key; docs/secure.md §2)")


def save_identity(key: Ed25519PrivateKey, directory: str | Path,
                  names: tuple[str, str] = (PRIVATE_FILE, PUBLIC_FILE)) -> tuple[Path, Path]:
    """Write the private key (PEM, 0600; default ``dealer.key``) and the public key (hex; default
    ``dealer.pub``) under ``directory``, atomically. ``names``: the two file names."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private, public = root / names[0], root / names[1]
    write_atomic(private, pem, 0o600)
    write_atomic(public, (identity_public(key).hex() + "\n").encode(), 0o644)
    return private, public


def load_identity(path: str | Path, what: str = "dealer key", maker: str = "dealer-keygen") -> Ed25519PrivateKey:
    """A long-term private key from a PKCS#8 PEM file (default: the dealer's, ``flower-split
    dealer-keygen``); ``what`` and ``maker`` name the key and its command in errors."""
    file = Path(path)
    try:
        key = serialization.load_pem_private_key(file.read_bytes(), password=None)
    except FileNotFoundError:
        raise ValueError(f"{what} {file}: file not found (make one with `flower-split {maker}`)") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} {file}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{what} {file}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def load_pinned(spec: str, what: str = "dealer-public-key") -> bytes:
    """A pinned public key from ``spec`` (default: the dealer's): 64 hex digits, or the path of a
    file holding them; ``what`` names the setting in errors."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what}: expected 64 hex digits or the path of a .pub file")
    text = spec.strip()
    if len(text) != 2 * IDENTITY_BYTES or not all(c in "0123456789abcdefABCDEF" for c in text):
        try:
            text = Path(text).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{what} {spec!r}: neither 64 hex digits nor a readable file ({exc})") from None
    try:
        raw = bytes.fromhex(text)
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError(f"{what} {spec!r}: expected 64 hex digits (an Ed25519 public key)") from None
    return raw
