"""A secure tenant's live party between messages (flower.live_parties) and the state codec.

The records in ``Context.state`` stay the authority: after every message they decode to exactly
the live party's state, a cached party is used only under the token of the records written from
it, and a failed message leaves no live party behind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.flower import secure_handlers
from flower_split.flower.live_parties import TOKEN_KEY, LiveParties
from flower_split.flower.records import STATE_STYPE, records_to_state, state_array, state_tensor, state_to_records
from flower_split.protocol import ProtocolError

from test_secure_flower import SECURE, _strategy


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 4), torch.randn(2, dtype=torch.float64), torch.randint(-2**62, 2**62, (5, 2, 3)),
    torch.randint(-9, 9, (4,), dtype=torch.int32), torch.rand(3, 3) > 0.5, torch.tensor(7), torch.zeros(0, 3),
    torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
], ids=lambda t: f"{t.dtype}{list(t.shape)}")
def test_state_tensors_round_trip_exactly(tensor: torch.Tensor) -> None:
    array = state_array("x", tensor)
    assert array.stype == STATE_STYPE and len(array.data) == tensor.numel() * tensor.element_size()
    back = state_tensor("x", array)
    assert back.dtype == tensor.dtype and torch.equal(back, tensor)
    back.zero_() if back.numel() else None  # a copy: the Array's bytes are untouched
    assert torch.equal(state_tensor("x", array), tensor)


def test_state_saved_in_flower_npy_arrays_still_loads_and_bad_arrays_are_named() -> None:
    old = Array(np.arange(6, dtype=np.int64).reshape(2, 3))  # the format before STATE_STYPE
    assert torch.equal(state_tensor("old", old), torch.arange(6).reshape(2, 3))
    good = state_array("x", torch.arange(6))
    for bad, reason in ((Array(dtype="int64", shape=(7,), stype=STATE_STYPE, data=good.data), "do not hold"),
                        (Array(dtype="int64", shape=(2, 2), stype=STATE_STYPE, data=good.data), "do not hold"),
                        (Array(dtype="float16", shape=(6,), stype=STATE_STYPE, data=good.data), "unsupported dtype"),
                        (Array(dtype="int64", shape=(-1,), stype=STATE_STYPE, data=good.data), "do not hold")):
        with pytest.raises(ProtocolError, match=f"state\\[t0\\].*{reason}"):
            records_to_state(ArrayRecord({"t0": bad}), state_to_records({"x": torch.arange(6)})[1])
    with pytest.raises(ProtocolError, match="bfloat16"):
        state_array("w", torch.zeros(2, dtype=torch.bfloat16))


def test_a_live_party_is_taken_only_under_its_token_and_only_once() -> None:
    live = LiveParties(limit=2)
    meta = ConfigRecord({"skeleton": "{}"})
    party = object()
    live.keep("a", meta, party)
    assert isinstance(meta[TOKEN_KEY], bytes) and len(meta[TOKEN_KEY]) == 16
    stale = ConfigRecord({**meta, TOKEN_KEY: b"\x00" * 16})  # records written by anything else
    assert live.take("a", stale) is None and len(live) == 0  # a miss also forgets the party
    live.keep("a", meta, party)
    assert live.take("a", meta) is party and live.take("a", meta) is None  # taken: gone until saved again
    for key in "abc":
        live.keep(key, ConfigRecord({}), object())
    assert len(live) == 2  # the least recently saved ("a") went first
    none = LiveParties(limit=0)
    none.keep("a", meta, party)
    assert len(none) == 0 and none.take("a", meta) is None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def test_records_decode_to_the_live_party_after_every_message(task_identity: None, tmp_path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    live = LiveParties()
    monkeypatch.setattr(secure_handlers, "LIVE", live)
    hits: list[bool] = []
    take = live.take

    def counting_take(key: Any, meta: ConfigRecord) -> Any:
        party = take(key, meta)
        hits.append(party is not None)
        return party

    monkeypatch.setattr(live, "take", counting_take)
    app = make_client_app({**SECURE, "label-protection": "client", "local-steps": 2, "num-server-rounds": 1})
    checked = {"messages": 0}

    def checking_app(message: Message, context: Context) -> Message:
        reply = app(message, context)
        if context.node_id == 1 and "secure.config" in context.state:
            token = context.state["secure.config"][TOKEN_KEY]
            token_now, party = live._parties[(context.run_id, context.node_id, "tenant-0")]
            assert token_now == token  # the cached party is the one these records were written from
            state = records_to_state(context.state["secure.arrays"], context.state["secure.config"])
            assert _equal(state, party.state_dict())
            checked["messages"] += 1
        return reply

    grid = LocalGrid(checking_app, 2, dealer=tmp_path)
    _strategy().start(grid, 1, eval_every=1)
    assert checked["messages"] > 20 and hits.count(True) > 20 and all(hits[1:])

    # a failed message (malformed content, after the party was taken) rolls the records back and
    # leaves no live party: the next message decodes the records
    before = dict(grid.contexts[1].state.items())
    reply = app(Message(RecordDict(), 1, "train.secure_next"), grid.contexts[1])
    assert reply.has_error()
    assert dict(grid.contexts[1].state.items()) == before
    assert (grid.contexts[1].run_id, 1, "tenant-0") not in live._parties
