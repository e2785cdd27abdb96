"""Split-plain's saved state: the tenant's adapters and optimizers; the cloud keeps no tenant state.

The plain cloud holds nothing per tenant between steps (no halves, no keys), so its
directory records only the body's fingerprint and the tenant ids; the tenant's holds its
``ClientParty.state_dict()`` (head, tail, optimizer and schedule state, step counter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from flower_split.backends.saved import Restored, SavedRun, load_party_state, save_common
from flower_split.config import RunConfig
from flower_split.model import SplitParts
from flower_split.protocol import ClientParty, CloudParty
from flower_split.train.sessions import PlainSession
from flower_split.transport import InProcessTransport


def save_plain(root: str | Path, config: RunConfig, parts: SplitParts, client: ClientParty,
               label_names: Sequence[str], total_steps: int) -> None:
    """Save a trained split-plain tenant and its cloud under ``root``."""
    save_common(root, "plain", config, parts, client.tenant, client.state_dict(), {}, label_names, total_steps)


def restore_plain(run: SavedRun, device: torch.device) -> Restored:
    """The saved tenant and a cloud around the checked body, wired by an in-process transport."""
    parts = run.parts
    client = ClientParty(run.tenant_id, parts.embedder, parts.head, parts.tail, run.config, run.total_steps, device)
    load_party_state(run.tenant, client.load_state_dict)
    session = PlainSession(client, InProcessTransport(CloudParty(parts.body, device)))
    return Restored(session, reserve_steps=lambda steps: None)
