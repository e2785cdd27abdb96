"""The party-state codec of ``Context.state`` (raw little-endian tensors, ``context_state.STATE_STYPE``).

Exact round trips for every stored dtype, states in Flower's older ``.npy`` arrays still load,
malformed arrays are named, and a secure tenant's saved records are a snapshot even though it
serializes its live tensors without copying them first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.flower import secure_handlers
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.tenant import tenant_data
from flower_split.flower.context_state import (
    MAX_STATE_ZEROS, STATE_STYPE, STATE_ZEROS_STYPE, records_to_state, state_array, state_tensor, state_to_records,
)
from flower_split.protocol import ProtocolError

from test_secure_flower import SECURE, _strategy


_SEEDED = torch.Generator().manual_seed(0)


# never all zero (those are stored without bytes, below): fixed values or a seeded generator
@pytest.mark.parametrize("tensor", [
    torch.randn(3, 4, generator=_SEEDED), torch.randn(2, dtype=torch.float64, generator=_SEEDED),
    torch.randint(-2**62, 2**62, (5, 2, 3), generator=_SEEDED), torch.tensor([3, -9, 0, 8], dtype=torch.int32),
    torch.tensor([[False, True, True], [True, False, False], [True, True, False]]), torch.tensor(7), torch.zeros(0, 3),
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
                        (Array(dtype="int64", shape=(-1,), stype=STATE_STYPE, data=good.data), "do not hold"),
                        # 2^32 * 2^32 elements wrap to 0 in np.prod's int64: the count must be exact
                        (Array(dtype="int64", shape=(2**32, 2**32), stype=STATE_STYPE, data=b""), "do not hold"),
                        (Array(dtype="int64", shape=(0, 2**62, 2**62), stype=STATE_STYPE, data=b""), "too big"),
                        (Array(dtype="bool", shape=(6,), stype=STATE_STYPE, data=bytes([0, 1, 2, 0, 1, 0])),
                         "bool bytes")):
        with pytest.raises(ProtocolError, match=f"state\\[t0\\].*{reason}"):
            records_to_state(ArrayRecord({"t0": bad}), state_to_records({"x": torch.arange(6)})[1])
    with pytest.raises(ProtocolError, match="bfloat16"):
        state_array("w", torch.zeros(2, dtype=torch.bfloat16))


@pytest.mark.parametrize("tensor", [torch.zeros(536, 384, dtype=torch.int64), torch.zeros(3, dtype=torch.int32),
                                    torch.zeros(2, 2, dtype=torch.bool), torch.zeros(4, 3, dtype=torch.int64).t()],
                         ids=lambda t: f"{t.dtype}{list(t.shape)}")
def test_an_all_zero_integer_tensor_is_stored_without_bytes(tensor: torch.Tensor) -> None:
    """A secure party's zero shares (of values its peer holds) cost no bytes in Context.state."""
    array = state_array("z", tensor)
    assert array.stype == STATE_ZEROS_STYPE and array.data == b"" and tuple(array.shape) == tuple(tensor.shape)
    back = state_tensor("z", array)
    assert back.dtype == tensor.dtype and torch.equal(back, tensor)
    back.fill_(1)  # a tensor of its own
    assert not state_tensor("z", array).any()


@pytest.mark.parametrize("tensor", [torch.zeros(3), torch.tensor([-0.0, 0.0]), torch.zeros(0, dtype=torch.int64),
                                    torch.tensor([0, 0, 1])], ids=["float", "signed-zero", "empty", "one-nonzero"])
def test_floating_empty_and_nonzero_tensors_are_stored_whole(tensor: torch.Tensor) -> None:
    array = state_array("x", tensor)
    assert array.stype == STATE_STYPE and len(array.data) == tensor.numel() * tensor.element_size()
    back = state_tensor("x", array)
    assert torch.equal(back, tensor) and torch.equal(back.signbit(), tensor.signbit())


def test_a_malformed_zero_array_is_named() -> None:
    meta = state_to_records({"x": torch.zeros(6, dtype=torch.int64)})[1]
    for bad, reason in ((Array(dtype="int64", shape=(6,), stype=STATE_ZEROS_STYPE, data=b"\0" * 48), "no bytes"),
                        (Array(dtype="float32", shape=(6,), stype=STATE_ZEROS_STYPE, data=b""), "floating"),
                        (Array(dtype="int64", shape=(-6,), stype=STATE_ZEROS_STYPE, data=b""), "not a shape"),
                        (Array(dtype="int64", shape=(0,), stype=STATE_ZEROS_STYPE, data=b""), "not a shape"),
                        (Array(dtype="int64", shape=(MAX_STATE_ZEROS, 2), stype=STATE_ZEROS_STYPE, data=b""),
                         "not a shape"),
                        (Array(dtype="int64", shape=(2**32, 2**32), stype=STATE_ZEROS_STYPE, data=b""), "not a shape"),
                        (Array(dtype="int64", shape=(-1, -1), stype=STATE_ZEROS_STYPE, data=b""), "not a shape"),
                        (Array(dtype="int64", shape=(True, True), stype=STATE_ZEROS_STYPE, data=b""), "not a shape"),
                        (Array(dtype="float16", shape=(6,), stype=STATE_ZEROS_STYPE, data=b""), "unsupported dtype")):
        with pytest.raises(ProtocolError, match=f"state\\[t0\\].*{reason}"):
            records_to_state(ArrayRecord({"t0": bad}), meta)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


def test_saved_records_never_alias_the_live_party_mid_step(task_identity: None, tmp_path) -> None:
    """The tenant saves ``state_dict(copy=False)`` (no clones): the records must still be a snapshot."""
    config = {**SECURE, "label-protection": "client", "local-steps": 1, "num-server-rounds": 1}
    app = make_client_app(config)
    mid_step: list[dict] = []

    def watching_app(message: Message, context: Context) -> Message:
        reply = app(message, context)
        if context.node_id == 1 and message.metadata.message_type == "train.secure_next" and not mid_step:
            mid_step.append(dict(context.state.items()))
        return reply

    _strategy().start(LocalGrid(watching_app, 2, dealer=tmp_path), 1, eval_every=0)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2,
                                                        "allow-unpinned-dealer": True},
                      state=RecordDict(mid_step[0]), run_config={})
    settings_config, settings = settings_from_run_config(config)
    data = tenant_data(settings_config, settings, context.node_config)
    party = secure_handlers._load(context, data, settings_config, settings)
    assert party.state_dict()["step"] is not None  # mid-step: masks, pending products, inbox
    before = records_to_state(context.state["secure.arrays"], context.state["secure.config"])
    secure_handlers._save(context, party, data, settings_config, settings)
    saved = records_to_state(context.state["secure.arrays"], context.state["secure.config"])
    assert _equal(saved, before) and _equal(saved, party.state_dict())
    live = _tensors(party.state_dict(copy=False))
    assert len(live) > 20
    for tensor in live:  # the party moves on in place after the save ...
        tensor.add_(1) if tensor.dtype != torch.bool else tensor.logical_not_()
    again = records_to_state(context.state["secure.arrays"], context.state["secure.config"])
    assert _equal(again, before)  # ... and the records do not
    assert not _equal(party.state_dict(), before)
    secure_handlers._save(context, party, data, settings_config, settings)  # every in-place write is seen
    assert _equal(records_to_state(context.state["secure.arrays"], context.state["secure.config"]),
                  party.state_dict())


def test_a_save_reuses_the_arrays_of_unchanged_tensors_only() -> None:
    """:data:`ArrayMemo`: an unchanged tensor keeps its Array; a write through any view, a new
    tensor in its place, or a new tensor makes a new one; the records always decode to the state."""
    # a: part of a larger storage, so c (a view of a) is stored apart, not as a view of a
    base, other = torch.arange(16, dtype=torch.int64)[2:14].reshape(3, 4), torch.ones(5)
    state = {"a": base, "b": [other], "c": base[1:]}
    memo: dict = {}
    first, _ = state_to_records(state, memo)
    second, meta = state_to_records(state, memo)
    assert all(second[key] is first[key] for key in first)  # nothing changed: nothing copied
    assert _equal(records_to_state(second, meta), state)
    state["c"][0, 0] = -7  # through the view: a's counter moves too
    third, meta = state_to_records(state, memo)
    assert third["t0"] is not second["t0"] and third["t2"] is not second["t2"] and third["t1"] is second["t1"]
    assert _equal(records_to_state(third, meta), state)
    state["b"] = [torch.ones(5)]  # equal values, another tensor: copied
    fourth, meta = state_to_records(state, memo)
    assert fourth["t1"] is not third["t1"] and _equal(records_to_state(fourth, meta), state)
    assert state_to_records(state)[0]["t0"] is not fourth["t0"]  # no memo: always copied
