"""A process's live secure parties (``flower.party_cache``): a message whose state was saved from
a live party takes that party instead of decoding, and behaves exactly as if it had decoded.

The cache is only a short cut: after every message of a secure run, the live party must equal,
attribute by attribute, the party a fresh process decodes from the node's state (an attribute
the state does not carry would make a long-lived simulation worker behave unlike a deployment's
fresh process). A failed message leaves no live party behind.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Context, Message

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.flower import secure_handlers
from flower_split.flower.party_cache import PartyCache
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.tenant import tenant_data
from flower_split.he import ClientKeys
from flower_split.model import Embedder
from flower_split.protocol.secure_keys import private_bytes

from test_secure_flower import SECURE, _strategy


def test_a_party_is_taken_once_by_its_token_and_key_only() -> None:
    cache: PartyCache[str] = PartyCache(capacity=2)
    token = cache.keep(("tenant-0", 1), "party")
    assert isinstance(token, bytes) and len(token) == 16
    assert cache.take(token, ("tenant-1", 1)) is None  # another tenant or settings: not served ...
    assert cache.take(token, ("tenant-0", 1)) is None  # ... and dropped, not kept for later
    token = cache.keep(("tenant-0", 1), "party")
    assert cache.take(b"\x00" * 16, ("tenant-0", 1)) is None and cache.take(None, ("tenant-0", 1)) is None
    assert cache.take(token, ("tenant-0", 1)) == "party"
    assert cache.take(token, ("tenant-0", 1)) is None  # taken: gone until filed again
    tokens = [cache.keep((f"tenant-{i}", 1), f"p{i}") for i in range(3)]  # capacity 2: the oldest leaves
    assert len(cache) == 2 and cache.take(tokens[0], ("tenant-0", 1)) is None
    assert cache.take(tokens[2], ("tenant-2", 1)) == "p2"
    cache.put_back(tokens[2], ("tenant-2", 1), "p2")  # a read-only handler files it again, same token
    assert cache.take(tokens[2], ("tenant-2", 1)) == "p2"
    off: PartyCache[str] = PartyCache(capacity=0)
    assert off.take(off.keep("k", "party"), "k") is None
    with pytest.raises(ValueError, match="capacity"):
        PartyCache(capacity=-1)


def test_a_new_save_of_a_tenant_drops_its_older_live_party() -> None:
    """A save whose state was lost (its reply discarded) leaves a party no state can take back:
    the tenant's next save drops it instead of letting it hold memory until capacity pushes it out."""
    cache: PartyCache[str] = PartyCache(capacity=8)
    lost = cache.keep(("tenant-0", 1), "old")
    other = cache.keep(("tenant-1", 1), "other")
    newest = cache.keep(("tenant-0", 1), "new")
    assert len(cache) == 2
    assert cache.take(lost, ("tenant-0", 1)) is None
    assert cache.take(other, ("tenant-1", 1)) == "other"  # another tenant's party is untouched
    assert cache.take(newest, ("tenant-0", 1)) == "new"


def _same(a: Any, b: Any, path: str) -> list[str]:
    """Where two parties (or parts of them) differ."""
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in _same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    if isinstance(a, X25519PrivateKey):
        return [] if private_bytes(a) == private_bytes(b) else [path]
    if isinstance(a, ClientKeys):
        return [] if a.to_bytes() == b.to_bytes() else [path]
    if isinstance(a, Embedder):  # the public embedder: one per process
        return [] if a is b else [path]
    if hasattr(a, "__dict__"):
        return _same(vars(a), vars(b), path)
    slots = [name for cls in type(a).__mro__ for name in getattr(cls, "__slots__", ())]
    if slots:
        return _same({n: getattr(a, n) for n in slots}, {n: getattr(b, n) for n in slots}, path)
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def live_and_decoded(message: Message, context: Context, run_config: Any, settings: Any,
                     differences: list[str]) -> tuple[Any, Any]:
    """After a handled message: the tenant's live party and one decoded afresh from its state
    (their differences added to ``differences``); the live one is saved back, so the run goes on
    with it."""
    data = tenant_data(run_config, settings, context.node_config)
    token = context.state[secure_handlers.SECURE_CONFIG][secure_handlers.LIVE_TOKEN]
    live = secure_handlers.PARTIES.take(token, secure_handlers._party_key(context, data, run_config, settings))
    assert live is not None, f"{message.metadata.message_type}: no live party after a save"
    fresh = secure_handlers._load(context, data, run_config, settings)  # nothing live: decoded
    assert fresh is not live
    differences.extend(_same(vars(live), vars(fresh), f"{message.metadata.message_type}: party"))
    secure_handlers._save(context, live, data, run_config, settings)
    return live, fresh


@pytest.mark.parametrize("mode,prior_offset", [("client", False), ("he", False), ("client", True)])
def test_the_live_party_equals_the_one_decoded_from_its_state(mode: str, prior_offset: bool, task_identity: None,
                                                              tmp_path) -> None:
    config = {**SECURE, "label-protection": mode, "local-steps": 2, "num-server-rounds": 1,
              "prior-offset": prior_offset}
    app = make_client_app(config)
    run_config, settings = settings_from_run_config(config)
    checked: list[str] = []
    differences: list[str] = []

    def checking_app(message: Message, context: Context) -> Message:
        reply = app(message, context)
        meta = context.state.get(secure_handlers.SECURE_CONFIG)
        if meta is None or reply.has_error():
            return reply
        live, fresh = live_and_decoded(message, context, run_config, settings, differences)
        assert (live.prior is not None) == (fresh.prior is not None) == prior_offset  # the offset is in the state too
        checked.append(message.metadata.message_type)
        return reply

    _strategy().start(LocalGrid(checking_app, 2, dealer=tmp_path), 1, eval_every=1)
    assert differences == []
    assert {"train.secure_setup", "train.secure_begin", "train.secure_next", "evaluate.secure_begin",
            "evaluate.secure_next"} <= set(checked)


def test_a_failed_message_leaves_no_live_party_and_the_next_decodes(task_identity: None, tmp_path) -> None:
    """A message refused after its handler took the live party: the state rolls back to the
    older token, which finds nothing live, and the run goes on from the decoded state."""
    config = {**SECURE, "label-protection": "client", "local-steps": 2, "num-server-rounds": 2}
    refused: list[bytes] = []
    calls = {"n": 0}

    def intercept(node: int, message_type: str) -> str | None:
        if node == 1 and message_type == "train.secure_next":
            calls["n"] += 1
            if calls["n"] == 3:
                return "error"  # a malformed message in the middle of a step
        return None

    app = make_client_app(config)

    def watching_app(message: Message, context: Context) -> Message:
        before = context.state.get(secure_handlers.SECURE_CONFIG)
        reply = app(message, context)
        if reply.has_error() and before is not None:
            token = before[secure_handlers.LIVE_TOKEN]
            assert context.state[secure_handlers.SECURE_CONFIG][secure_handlers.LIVE_TOKEN] == token  # rolled back
            assert token not in secure_handlers.PARTIES._entries  # taken by the failed handler, not filed again
            refused.append(token)
        return reply

    grid = LocalGrid(watching_app, 2, intercept, dealer=tmp_path)
    strategy = _strategy()
    reports: list = []
    strategy.start(grid, 2, eval_every=0, on_report=reports.append)
    assert len(refused) == 1
    rounds = [r for r in reports if hasattr(r, "dropped")]
    assert "tenant-0" in rounds[0].dropped and rounds[1].tenants == ["tenant-0", "tenant-1"] and not rounds[1].dropped
