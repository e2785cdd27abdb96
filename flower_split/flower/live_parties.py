"""A tenant's live secure party kept in this process between two messages of its node.

``Context.state`` is the authority on a party's state: every message still ends by writing the
party's records (so a failed message rolls back, a restarted process resumes, and any worker
process can serve the next message). Decoding those records again at the start of the next
message is the waste this removes: the records written at a save carry a random *token*, and a
process that still holds the very party object it saved under that token uses it instead of
rebuilding it from the records (profiled at MiniLM size: the decode was a third of the per-message
state cost, docs/BENCHMARKS.md).

Safety rests on two rules. A party is *taken* out of the cache when a message starts, so a message
that fails after mutating it leaves nothing behind; the next message decodes the records, which
``tenant.handle`` rolled back. And a party is put back only together with the records written from
it, under a fresh token, so records changed by anything else (a rollback, another process, a
restored mirror) never match a cached party. At most ``limit`` parties are kept per process (least
recently saved first out); a miss costs only the decode it would have cost anyway.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Any, Hashable

from flwr.app import ConfigRecord

TOKEN_KEY = "live-token"
"""Key of the token in the party's ConfigRecord of ``Context.state``."""

DEFAULT_LIMIT = 32


class LiveParties:
    """Parties by node, each valid only while its records carry the token it was saved under."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"limit: expected >= 0, got {limit}")
        self.limit = limit
        self._parties: OrderedDict[Hashable, tuple[bytes, Any]] = OrderedDict()

    def take(self, key: Hashable, meta: ConfigRecord) -> Any | None:
        """The party saved under ``meta``'s token for ``key``, removed from the cache; None on a miss."""
        entry = self._parties.pop(key, None)
        if entry is None or meta.get(TOKEN_KEY) != entry[0]:
            return None
        return entry[1]

    def keep(self, key: Hashable, meta: ConfigRecord, party: Any) -> None:
        """Stamp ``meta`` (the records just written from ``party``) with a fresh token; cache ``party``."""
        token = secrets.token_bytes(16)
        meta[TOKEN_KEY] = token
        self._parties.pop(key, None)
        if self.limit == 0:
            return
        self._parties[key] = (token, party)
        while len(self._parties) > self.limit:
            self._parties.popitem(last=False)

    def clear(self) -> None:
        self._parties.clear()

    def __len__(self) -> int:
        return len(self._parties)
