"""Pinned sharing keys (flower.sharing_keys): node config, signatures, what a tenant refuses."""

from __future__ import annotations

import os

import numpy as np

import pytest

from flower_split.cli import main
from flower_split.flower.sharing_keys import KEY_FILES, SharingIdentity, load_peers, sharing_identity, sign_keys, verify_peers
from flower_split.protocol import ProtocolError
from flower_split.protocol.dealer_identity import identity_public, new_identity, save_identity


def _tenants(tmp_path, count: int) -> list[tuple[str, str]]:
    return [tuple(map(str, save_identity(new_identity(), tmp_path / f"t{i}", KEY_FILES))) for i in range(count)]


def test_peers_load_from_a_list_a_file_of_keys_or_a_file_of_pub_paths(tmp_path) -> None:
    tenants = _tenants(tmp_path, 3)
    hexes = [open(pub).read().strip() for _, pub in tenants]
    as_bytes = frozenset(bytes.fromhex(h) for h in hexes)
    assert load_peers(",".join(hexes)) == load_peers(" ".join(hexes)) == as_bytes
    listing = tmp_path / "peers.txt"
    listing.write_text(f"# the federation's tenants\n{hexes[0]}  # tenant 0\n{tenants[1][1]}\n\n{hexes[2]}\n")
    assert load_peers(str(listing)) == as_bytes
    assert load_peers(hexes[0]) == frozenset([bytes.fromhex(hexes[0])])
    for bad, message in ((f"{hexes[0]},{hexes[0]}", "listed twice"), ("zz" * 32 + "," + hexes[1], "64 hex"),
                         (str(tmp_path / "missing.txt"), "readable file")):
        with pytest.raises(ValueError, match=message):
            load_peers(bad)


def test_node_config_own_key_is_dropped_from_the_pins_and_peers_need_a_key(tmp_path, monkeypatch) -> None:
    tenants = _tenants(tmp_path, 3)
    peers = ",".join(open(pub).read().strip() for _, pub in tenants)  # one list for all, its own key included
    identity = sharing_identity({"share-key": tenants[0][0], "share-peers": peers})
    assert identity.public not in identity.peers and len(identity.peers) == 2
    with pytest.raises(ProtocolError, match="needs share-key"):
        sharing_identity({"share-peers": peers})
    with pytest.raises(ProtocolError, match="share-key .*file not found"):
        sharing_identity({"share-key": str(tmp_path / "none.key"), "share-peers": peers})
    for name in ("FLOWER_SPLIT_SHARE_KEY", "FLOWER_SPLIT_SHARE_PEERS", "FLOWER_SPLIT_ALLOW_UNPINNED_SHARING"):
        monkeypatch.delenv(name, raising=False)
    assert sharing_identity({}) == SharingIdentity(None, None, False)
    assert sharing_identity({"allow-unpinned-sharing": True}).allow_unpinned
    monkeypatch.setenv("FLOWER_SPLIT_ALLOW_UNPINNED_SHARING", "1")
    assert sharing_identity({}).allow_unpinned


def test_verify_peers_accepts_pinned_signed_keys_only(tmp_path) -> None:
    keys = [new_identity() for _ in range(4)]
    pins = frozenset(identity_public(k) for k in keys[1:3])
    victim = SharingIdentity(keys[0], pins)
    pairs = {str(n): [os.urandom(32), os.urandom(32)] for n in (10, 11, 12)}

    def signed(node: str, key) -> list[bytes]:
        return sign_keys(SharingIdentity(key, None), 7, int(node), *pairs[node])

    good = {"11": signed("11", keys[1]), "12": signed("12", keys[2])}
    assert verify_peers(victim, 7, 10, pairs, good) == {11: identity_public(keys[1]), 12: identity_public(keys[2]),
                                                        10: identity_public(keys[0])}
    cases = {
        "unsigned": {"11": good["11"]},
        "does not pin": {**good, "12": signed("12", keys[3])},
        "same pinned key": {"11": good["11"], "12": signed("12", keys[1])},
        "do not verify": {"11": good["11"], "12": sign_keys(SharingIdentity(keys[2], None), 7, 11, *pairs["11"])},
    }
    for message, signatures in cases.items():
        with pytest.raises(ProtocolError, match=message):
            verify_peers(victim, 7, 10, pairs, signatures)
    with pytest.raises(ProtocolError, match="do not verify"):
        verify_peers(victim, 8, 10, pairs, good)  # another run's signatures
    swapped = {**pairs, "12": [pairs["12"][0], os.urandom(32)]}  # the cloud's own pk2 for tenant 12
    with pytest.raises(ProtocolError, match="do not verify"):
        verify_peers(victim, 7, 10, swapped, good)
    with pytest.raises(ProtocolError, match="pins no other tenant"):
        verify_peers(SharingIdentity(keys[0], None), 7, 10, pairs, good)
    assert verify_peers(SharingIdentity(None, None, allow_unpinned=True), 7, 10, pairs, None) == {}


def test_share_keygen_writes_a_key_pair_and_never_replaces_it(tmp_path, capsys) -> None:
    assert main(["share-keygen", "--out", str(tmp_path)]) == 0
    private, public = tmp_path / KEY_FILES[0], tmp_path / KEY_FILES[1]
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    identity = sharing_identity({"share-key": str(private), "share-peers": public.read_text().strip()})
    assert identity.peers == frozenset()  # its own key only: pins no one else
    assert main(["share-keygen", "--out", str(tmp_path)]) == 2


def test_full_entropy_masks_are_uniform_shaped_and_use_the_whole_seed() -> None:
    from flower_split.flower.secagg_prg import full_entropy_masks

    seed = bytes(range(32))
    a, b, c = full_entropy_masks(seed, 1 << 31, [(3, 4), (), (5000,)])
    assert a.shape == (3, 4) and b.shape == () and c.shape == (5000,) and c.dtype == np.int64
    assert 0 <= c.min() and c.max() < 1 << 31 and abs(c.mean() / 2**31 - 0.5) < 0.02
    # Flower's own generator keeps the XOR of the seed's 32-bit words: these two seeds collide there
    twin = bytes(range(4, 8)) + bytes(range(0, 4)) + bytes(range(8, 32))
    assert not np.array_equal(full_entropy_masks(twin, 1 << 31, [(5000,)])[0], c)
    assert np.array_equal(full_entropy_masks(seed, 1 << 31, [(3, 4), (), (5000,)])[2], c)  # deterministic
    odd = full_entropy_masks(seed, 1000, [(20000,)])[0]  # a range that is not a power of two: rejection
    assert odd.max() < 1000 and abs(np.bincount(odd, minlength=1000).std() / 20 - 0.2) < 0.1
