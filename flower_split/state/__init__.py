"""Saved party state: what a tenant, the cloud and the dealer keep between runs.

``codec`` turns a party's ``state_dict()`` into JSON + tensors, ``store`` writes and reads one
party's versioned directory atomically and strictly, ``layout`` names the directories of a
run's parties and checks model fingerprints. It knows no party classes: the security
backends (:mod:`flower_split.backends`) decide what each party saves and how it is restored.
docs/STATE.md describes the format.
"""

from flower_split.state.codec import CodecError, decode, digest, encode
from flower_split.state.layout import (
    CLOUD, DEALER, TENANT, check_fingerprint, cloud_dir, dealer_dir, find_state_root, module_sha256, only_tenant,
    tenant_dir,
)
from flower_split.state.store import FORMAT_VERSION, META_FILE, SavedParty, StateError, read_party, write_party

__all__ = [
    "CLOUD", "DEALER", "FORMAT_VERSION", "META_FILE", "TENANT", "CodecError", "SavedParty", "StateError",
    "check_fingerprint", "cloud_dir", "dealer_dir", "decode", "digest", "encode", "find_state_root",
    "module_sha256", "only_tenant", "read_party", "tenant_dir", "write_party",
]
