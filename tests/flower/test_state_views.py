"""Shared memory in a saved party state (``context_state``): stored once, back as it was.

A tensor that is the same memory as one saved before it, or a view of a saved tensor that was its
storage's whole memory, is saved as a reference (``{"w": [key, shape, strides, offset]}``) and
comes back as that view of one decoded tensor; a hostile reference (outside its tensor, too
large, naming nothing, malformed) is a named ProtocolError, never a read outside the tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from flower_split.flower.context_state import MAX_STATE_ZEROS, records_to_state, state_to_records
from flower_split.protocol import ProtocolError

_VIEWS = {
    "t": lambda x: x.flatten(1).t(),
    "flat": lambda x: x.flatten(0, 1),
    "row": lambda x: x[1],
    "cols": lambda x: x[:, :, 1:3],
    "same": lambda x: x,
    "step": lambda x: x[::2],
}


def _stored(arrays) -> int:
    return sum(len(array.data) for array in arrays.values())


@settings(max_examples=40, deadline=None)
@given(views=st.lists(st.sampled_from(sorted(_VIEWS)), max_size=6), base_last=st.booleans(),
       dtype=st.sampled_from([torch.int64, torch.float32]))
def test_views_and_aliases_come_back_equal_and_sharing_their_tensor(views: list[str], base_last: bool,
                                                                   dtype: torch.dtype) -> None:
    base = (torch.randint(-2**62, 2**62, (4, 3, 5)) if dtype == torch.int64 else torch.randn(4, 3, 5)).to(dtype)
    state = {f"v{i}": _VIEWS[name](base) for i, name in enumerate(views)}
    state = {**state, "base": base} if base_last else {"base": base, **state}
    arrays, meta = state_to_records(state)
    back = records_to_state(arrays, meta)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    if not base_last:  # every view refers to the base: stored once, and written through together
        assert _stored(arrays) == base.numel() * base.element_size()
        back["base"].view(-1)[:] = 0
        assert all(not back[key].any() for key in back)


def test_a_secure_save_keeps_halves_rollback_points_masks_and_products_once(task_identity: None) -> None:
    """The shapes of a secure party's state: a rollback point holds the halves, a pending product
    the views of its value, mask share and opening; each is stored once."""
    value = torch.randint(-2**62, 2**62, (2, 3, 8))
    share = torch.randint(-2**62, 2**62, (2, 3, 8))
    sent = value - share
    halves = {"A": torch.randint(-2**62, 2**62, (8, 4))}
    state = {"halves": halves, "rollback": [dict(halves)],
             "values": {"x": value}, "masks": {"x": {"share": share, "sent": sent}},
             "pending": [{"x": value.flatten(0, 1), "a": share.flatten(0, 1), "sent": [sent.flatten(0, 1)]},
                         {"x": value.flatten(0, 1).t(), "a": share.flatten(0, 1).t(), "sent": [sent.flatten(0, 1).t()]}]}
    arrays, meta = state_to_records(state)
    assert _stored(arrays) == 8 * (3 * value.numel() + halves["A"].numel())
    back = records_to_state(arrays, meta)
    assert torch.equal(back["pending"][1]["sent"][0], sent.flatten(0, 1).t())
    assert back["rollback"][0]["A"] is back["halves"]["A"]


def _meta(skeleton: object, fmt: object = 2) -> ConfigRecord:
    """Records' meta with ``skeleton`` (a string is taken as the JSON itself)."""
    return ConfigRecord({"skeleton": skeleton if isinstance(skeleton, str) else json.dumps(skeleton), "format": fmt})


@pytest.mark.parametrize("view, reason", [
    (["t0", [4], [1], 1], "reaches outside"),          # the last element is one past the end
    (["t0", [2, 2], [3, 1], 0], "reaches outside"),
    (["t0", [0], [1], 6], "reaches outside"),           # an empty view past the end
    (["t0", [-1], [1], 0], "malformed view"),
    (["t0", [2], [-1], 1], "malformed view"),
    (["t0", [2], [1], True], "malformed view"),
    (["t0", [2], [1, 1], 0], "malformed view"),
    (["t0", [2], [1]], "malformed view"),
    ("t0", "malformed view"),
    (["t9", [2], [1], 0], "does not hold"),
    (["t0", [MAX_STATE_ZEROS, 2], [0, 0], 0], "claims more than"),
    (["t0", [1], [10**30], 0], "reaches outside"),     # a stride torch cannot hold
    (["t0", [0, 10**30], [1, 1], 0], "claims more than"),
])
def test_a_hostile_view_is_named_and_never_read(view: object, reason: str) -> None:
    arrays, _ = state_to_records({"x": torch.arange(4, dtype=torch.int64)})
    with pytest.raises(ProtocolError, match=reason):
        records_to_state(arrays, _meta({"d": [["x", {"t": "t0"}], ["y", {"w": view}]]}))


@pytest.mark.parametrize("skeleton", [
    {"d": [["x"]]}, {"d": 3}, {"l": 3}, {"u": None}, {"b": []}, {"d": [[["k"], {"v": 1}]]},
    {"l": [], "u": []}, '{"l": [' * 5000 + "]}" * 5000, "not json",
])
def test_a_malformed_skeleton_is_a_named_protocol_error(skeleton: object) -> None:
    arrays, _ = state_to_records({"x": torch.arange(4)})
    with pytest.raises(ProtocolError, match="malformed skeleton"):
        records_to_state(arrays, _meta(skeleton))


def test_two_storages_at_one_address_are_never_taken_for_one() -> None:
    """Buffers of different lengths may start at one address (a prefix and the whole)."""
    buffer = bytearray(range(48))
    prefix, whole = torch.frombuffer(buffer, dtype=torch.int64, count=2), torch.frombuffer(buffer, dtype=torch.int64)
    arrays, meta = state_to_records({"a": prefix, "b": whole})
    back = records_to_state(arrays, meta)
    assert torch.equal(back["a"], prefix) and torch.equal(back["b"], whole)


def test_an_unknown_skeleton_tag_or_a_newer_format_is_named() -> None:
    arrays, meta = state_to_records({"x": torch.arange(4)})
    with pytest.raises(ProtocolError, match="unknown skeleton tag"):
        records_to_state(arrays, _meta({"d": [["x", {"q": 1}]]}))
    with pytest.raises(ProtocolError, match="malformed skeleton"):
        records_to_state(arrays, _meta({"d": [["x", {"t": "t0", "v": 1}]]}))
    with pytest.raises(ProtocolError, match="format 3"):
        records_to_state(arrays, _meta(json.loads(meta["skeleton"]), fmt=3))
    assert torch.equal(records_to_state(arrays, _meta(json.loads(meta["skeleton"]), fmt=1))["x"], torch.arange(4))
