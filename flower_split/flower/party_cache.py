"""A process's live secure parties between a node's messages, so a message need not rebuild one.

``context.state`` stays the one record of a tenant's party: every message still saves the party
into it, because a deployment SuperNode may run each message in a fresh process and a simulation
may hand a node to another worker. What this cache saves is the way back in a long-lived process
(a simulation worker, the in-process grid): decoding 10-50 MB of step state and building fresh
adapters only to overwrite them, most of a secure tenant's CPU per message (docs/BENCHMARKS.md).

Each save files the party under a fresh random token and writes the token next to the state; a
later message whose state carries that token, for the same tenant under the same run settings,
takes the live party back instead of decoding. Taking removes the party from the cache, so a
handler that fails after changing it leaves nothing stale behind: the rolled-back state carries
the older token, finds nothing, and is decoded. A state restored from a mirror, copied to another
node or replayed finds nothing either, unless it is exactly the state the cached party was saved
as. The party must not be changed after it is filed (:meth:`PartyCache.keep` is a handler's last
touch of it).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Generic, TypeVar

Party = TypeVar("Party")

TOKEN_BYTES = 16
DEFAULT_CAPACITY = 32  # a simulation worker may serve every tenant of a federation in turn


class PartyCache(Generic[Party]):
    """At most ``capacity`` parties, each under the token of the state it was saved as."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, tuple[object, Party]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, token: object, key: object) -> Party | None:
        """The party saved under ``token`` for ``key`` (compared with ``==``: the tenant and the
        run settings it was built under), removed from the cache; None when there is none, or
        when it was saved for another key."""
        if not isinstance(token, bytes):
            return None
        entry = self._entries.pop(token, None)
        if entry is None or entry[0] != key:
            return None
        return entry[1]

    def keep(self, key: object, party: Party) -> bytes:
        """File ``party`` (its state just saved) for ``key``; the token to store with that state.

        Any other party filed for ``key`` leaves: only the newest state of a tenant can be taken
        back, and an older one (its save lost, e.g. a message whose reply Flower discarded) would
        otherwise hold its memory until ``capacity`` newer saves pushed it out. The least recently
        filed party leaves when the cache is full."""
        for stale in [t for t, (k, _) in self._entries.items() if k == key]:
            del self._entries[stale]
        token = secrets.token_bytes(TOKEN_BYTES)
        self.put_back(token, key, party)
        return token

    def put_back(self, token: object, key: object, party: Party) -> None:
        """File again a party taken under ``token`` and left unchanged (a handler that only read
        it and saved nothing: the state still carries ``token``)."""
        if self.capacity and isinstance(token, bytes):
            self._entries[token] = (key, party)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
