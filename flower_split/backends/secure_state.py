"""Split-secure's saved state: three parties, three directories, secrets kept apart.

* tenant: ``SecureClientParty.state_dict()`` — its adapter halves and momentum, its X25519
  key and dealer key, its CKKS secret keys (``he``), its step counter;
* cloud: ``SecureCloudParty.state_dict()`` — per tenant its halves, momentum, set-up (public
  keys, the public CKKS context), its own dealer key and step counter; no tenant secret;
* dealer: ``SecureDealerParty.state_dict()`` — its X25519 key, per tenant the two derived
  keys and the next step it may serve.

Beaver material is derived from the step number, so a step number must never be used twice
with other inputs. A restored run therefore *reserves* its step numbers before it uses them
(:func:`restore_secure`'s ``reserve_steps``): the three counters are advanced on disk —
dealer first — before the steps run, so a crash or a second load from the same directory
skips numbers (allowed) but never repeats one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from flower_split.backends.saved import Restored, SavedRun, load_party_state, save_common
from flower_split.config import RunConfig
from flower_split.model import SplitParts
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.state import CLOUD, DEALER, TENANT, StateError, cloud_dir, dealer_dir, read_party, tenant_dir
from flower_split.state import write_party
from flower_split.train.sessions import SecureSession
from flower_split.transport import SecureLocalTransport


def save_secure(root: str | Path, config: RunConfig, parts: SplitParts, client: SecureClientParty,
                cloud: SecureCloudParty, dealer: SecureDealerParty, label_names: Sequence[str],
                total_steps: int) -> None:
    """Save a trained secure tenant, its cloud and the dealer under ``root``."""
    write_party(dealer_dir(root), DEALER, dealer.state_dict(), {"tenants": [client.tenant]})
    save_common(root, "secure", config, parts, client.tenant, client.state_dict(), cloud.state_dict(),
                label_names, total_steps)


def restore_secure(run: SavedRun, device: torch.device) -> Restored:
    """Dealer, cloud and tenant loaded from their directories and wired in process."""
    saved_dealer = read_party(dealer_dir(run.root), DEALER)
    if run.tenant_id not in saved_dealer.meta.get("tenants", []):
        raise StateError(f"{saved_dealer.meta_file}: the dealer holds no keys of tenant {run.tenant_id!r}")
    parts = run.parts
    dealer = SecureDealerParty()
    load_party_state(saved_dealer, lambda state: dealer.load_state_dict(state, same_identity=False))
    cloud = SecureCloudParty(parts.body, dealer.public, device)
    load_party_state(run.cloud, cloud.load_state_dict)
    client = SecureClientParty(run.tenant_id, parts.embedder, parts.head, parts.tail, run.config, run.total_steps)
    load_party_state(run.tenant, client.load_state_dict)
    if client.steps_in_flight or cloud.pending_steps:
        raise StateError(f"{run.root}: a step was in flight when this state was saved; it cannot serve inference")
    session = SecureSession(client, SecureLocalTransport(cloud, dealer))
    return Restored(session, reserve_steps=lambda steps: _reserve(run, client, cloud, dealer, steps))


def _reserve(run: SavedRun, client: SecureClientParty, cloud: SecureCloudParty, dealer: SecureDealerParty,
             steps: int) -> None:
    """Persist every party's counter advanced by ``steps`` (dealer, cloud, tenant) before they run."""
    tenant = run.tenant_id
    state = client.state_dict()
    ahead = int(state["next_step"]) + steps
    dealer_state = dealer.state_dict()
    dealer_state["tenants"][tenant]["next_step"] = ahead
    write_party(dealer_dir(run.root), DEALER, dealer_state, {"tenants": sorted(dealer_state["tenants"])})
    cloud_state = cloud.state_dict()
    cloud_state["tenants"][tenant]["next_step"] = ahead
    write_party(cloud_dir(run.root), CLOUD, cloud_state, run.cloud.meta)
    state["next_step"] = ahead
    write_party(tenant_dir(run.root, tenant), TENANT, state, run.tenant.meta)
