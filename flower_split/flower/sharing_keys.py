"""A tenant's identity in cross-tenant sharing: pinned keys for Flower's SecAgg+ key exchange.

Why: SecAgg+ hides one tenant's vector only if the other participants are real tenants. The
cloud relays every public key (it runs the SuperLink), so without authentication it can invent
the other participants (key pairs it made itself), receive the victim's key shares encrypted
to them, and unmask the victim's vector alone (docs/secure.md §10). So each tenant signs the
two SecAgg+ public keys it makes at set-up with a long-term Ed25519 key (node config
``share-key``, made by ``flower-split share-keygen``) and accepts a key exchange only if every
other participant's keys are signed by a distinct key it pins (node config ``share-peers``:
the tenants' ``share.pub`` keys, 64 hex digits each, in a list or a file of lines; its own key
there is ignored, so one file may serve every tenant). The
cloud relays the signatures (:mod:`~flower_split.flower.sharing_server`); it cannot make one.

Signed: ``CONTEXT | run id | node id | pk1 | pk2``. An entry replayed from another phase
carries keys whose private halves the cloud does not hold: it can decrypt no key share sent
to them and compute no mask agreed with them.

Without pins a tenant takes part only if its own node config says ``allow-unpinned-sharing``
(or ``FLOWER_SPLIT_ALLOW_UNPINNED_SHARING=1``: simulations, where every party runs in one
process tree): then sharing holds against a semi-honest cloud only.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flower_split.flower.dealer_node import node_flag, node_setting
from flower_split.protocol import ProtocolError
from flower_split.protocol.dealer_identity import IDENTITY_BYTES, SIGNATURE_BYTES, identity_public, load_identity, load_pinned

SHARE_KEY_CONFIG, SHARE_KEY_ENV = "share-key", "FLOWER_SPLIT_SHARE_KEY"
SHARE_PEERS_CONFIG, SHARE_PEERS_ENV = "share-peers", "FLOWER_SPLIT_SHARE_PEERS"
UNPINNED_SHARING_CONFIG, UNPINNED_SHARING_ENV = "allow-unpinned-sharing", "FLOWER_SPLIT_ALLOW_UNPINNED_SHARING"
KEY_FILES = ("share.key", "share.pub")  # what `flower-split share-keygen` writes
_CONTEXT = b"flower-split/secagg-keys/v1"
_VIEW_CONTEXT = b"flower-split/secagg-view/v1"


@dataclass(frozen=True)
class SharingIdentity:
    """A tenant's sharing keys: its own signing key (None: none configured) and the pinned
    keys of the tenants it shares with (None: it pins none)."""

    key: Ed25519PrivateKey | None
    peers: frozenset[bytes] | None
    allow_unpinned: bool = False

    @property
    def public(self) -> bytes | None:
        return None if self.key is None else identity_public(self.key)


def sharing_identity(node_config: Mapping[str, Any]) -> SharingIdentity:
    """The node's sharing keys from its node config (or environment); ProtocolError on a bad setting."""
    key_path = node_setting(node_config, SHARE_KEY_CONFIG, SHARE_KEY_ENV)
    peers_spec = node_setting(node_config, SHARE_PEERS_CONFIG, SHARE_PEERS_ENV)
    allow = node_flag(node_config, UNPINNED_SHARING_CONFIG, UNPINNED_SHARING_ENV)
    try:
        key = None if key_path is None else load_identity(key_path, "share-key", "share-keygen")
        peers = None if peers_spec is None else load_peers(peers_spec)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc
    if peers is not None and key is None:
        raise ProtocolError(f"node config {SHARE_PEERS_CONFIG} needs {SHARE_KEY_CONFIG} (this tenant's own key, "
                            "which the tenants it pins check in turn; `flower-split share-keygen`)")
    if peers is not None and key is not None:
        peers = peers - {identity_public(key)}  # one list of every tenant's key may serve all of them
    return SharingIdentity(key, peers, allow)


def load_peers(spec: str) -> frozenset[bytes]:
    """Pinned keys: 64-hex-digit keys separated by commas or whitespace, or the path of a file of
    them (one per line, ``#`` comments; each line may also be the path of a ``share.pub``)."""
    text = spec
    if not any(sep in spec for sep in ", \n") and len(spec.strip()) != 2 * IDENTITY_BYTES:
        try:
            text = Path(spec).read_text()
        except OSError as exc:
            raise ValueError(f"{SHARE_PEERS_CONFIG} {spec!r}: neither keys nor a readable file ({exc})") from None
    items = [item for line in text.splitlines() for item in line.split("#")[0].replace(",", " ").split()]
    keys = [load_pinned(item, SHARE_PEERS_CONFIG) for item in items]
    if not keys:
        raise ValueError(f"{SHARE_PEERS_CONFIG} {spec!r}: no keys")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{SHARE_PEERS_CONFIG} {spec!r}: a key is listed twice")
    return frozenset(keys)


def _signed_bytes(run_id: int, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    return b"|".join((_CONTEXT, struct.pack(">QQ", run_id % (1 << 64), node_id % (1 << 64)),
                      struct.pack(">I", len(pk1)) + pk1, struct.pack(">I", len(pk2)) + pk2))


def sign_keys(identity: SharingIdentity, run_id: int, node_id: int, pk1: bytes, pk2: bytes) -> list[bytes] | None:
    """``[public key, signature]`` over this node's SecAgg+ keys (None: the node has no key)."""
    if identity.key is None:
        return None
    return [identity_public(identity.key), identity.key.sign(_signed_bytes(run_id, node_id, pk1, pk2))]


def verify_peers(identity: SharingIdentity, run_id: int, own_node: int, keys: Mapping[str, Any],
                 signatures: Mapping[str, Any] | None) -> dict[int, bytes]:
    """Check the key exchange's other participants against the pins; return each participant's
    signing key by node id (this tenant's own included; empty when unpinned).

    Pinned: each other entry of ``keys`` (``{node id: [pk1, pk2]}``) must carry in ``signatures``
    a signature of its node id and keys by a pinned key, no pinned key twice. Unpinned: refused
    unless the node allows it. ProtocolError otherwise.
    """
    others = {nid: pair for nid, pair in keys.items() if nid != str(own_node)}
    if identity.peers is None:
        if not identity.allow_unpinned:
            raise ProtocolError(f"sharing: this tenant pins no other tenant's key (node config {SHARE_PEERS_CONFIG}), "
                                "so the cloud could make up every other participant of SecAgg+ and unmask this "
                                f"tenant's parameters; refused (set {SHARE_PEERS_CONFIG} and {SHARE_KEY_CONFIG}, or "
                                f"{UNPINNED_SHARING_CONFIG} = true to trust the cloud to be semi-honest)")
        return {}
    signers: dict[bytes, int] = {}
    for nid, pair in sorted(others.items()):
        entry = (signatures or {}).get(nid)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(b, bytes) for b in entry)
                and len(entry[1]) == SIGNATURE_BYTES and isinstance(pair, list) and len(pair) == 2):
            raise ProtocolError(f"sharing: participant {nid}'s SecAgg+ keys are unsigned; refused (only tenants "
                                f"pinned in {SHARE_PEERS_CONFIG} may take part)")
        public, signature = entry
        if public not in identity.peers:
            raise ProtocolError(f"sharing: participant {nid} signs with a key this tenant does not pin; refused")
        if public in signers:
            raise ProtocolError("sharing: two participants sign with the same pinned key; refused")
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, _signed_bytes(run_id, int(nid), *pair))
        except (InvalidSignature, ValueError, TypeError):
            raise ProtocolError(f"sharing: participant {nid}'s SecAgg+ keys do not verify under its pinned key "
                                "(keys swapped on the way); refused") from None
        signers[public] = int(nid)
    own = {own_node: identity.public} if identity.public is not None else {}
    return {**{nid: public for public, nid in signers.items()}, **own}


def view_digest(run_id: int, keys: Mapping[int, Any], alive: list[int], dropped: list[int]) -> bytes:
    """What a tenant signs in the consistency stage: the phase (run id, every participant's
    SecAgg+ keys) and the view it was shown (who is alive, who dropped)."""
    digest = hashlib.sha256(_VIEW_CONTEXT + struct.pack(">Q", run_id % (1 << 64)))
    for nid in sorted(keys):
        pk1, pk2 = keys[nid]
        digest.update(struct.pack(">QI", nid % (1 << 64), len(pk1)) + pk1 + struct.pack(">I", len(pk2)) + pk2)
    for name, nodes in ((b"alive", alive), (b"dropped", dropped)):
        digest.update(name + struct.pack(f">I{len(nodes)}Q", len(nodes), *(n % (1 << 64) for n in sorted(nodes))))
    return digest.digest()


def sign_view(identity: SharingIdentity, digest: bytes) -> list[bytes] | None:
    """``[public key, signature]`` over a view digest (None: the node has no key)."""
    if identity.key is None:
        return None
    return [identity_public(identity.key), identity.key.sign(_VIEW_CONTEXT + digest)]


def view_signers(signers: Mapping[int, bytes], digest: bytes, signatures: Mapping[str, Any] | None) -> int:
    """How many participants (``signers``: node id -> the key that signed its SecAgg+ keys) signed
    ``digest``; a signature by another key, or one that does not verify, does not count."""
    count = 0
    for nid, entry in (signatures or {}).items():
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(b, bytes) for b in entry)):
            continue
        public = signers.get(int(nid)) if str(nid).lstrip("-").isdigit() else None
        if public is None or entry[0] != public:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(entry[1], _VIEW_CONTEXT + digest)
        except (InvalidSignature, ValueError):
            continue
        count += 1
    return count
