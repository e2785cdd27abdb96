"""A party's state in Flower's ``Context.state``: a nested ``state_dict`` <-> an ``ArrayRecord``
of its tensors plus a ``ConfigRecord`` of its structure (:func:`state_to_records`,
:func:`records_to_state`).

A node keeps its parties (tenant, dealer) here between messages, and in a simulation Flower ships
the whole ``Context`` to the worker with every message, so the codec is built for size and copies:
tensors as raw little-endian bytes (:data:`STATE_STYPE`), all-zero integer tensors as a shape only
(:data:`STATE_ZEROS_STYPE`), a live party's unchanged tensors reuse the previous save's Arrays
(:data:`ArrayMemo`), and a tensor that shares memory with one saved before it is saved as a
reference to that one (:func:`state_to_records`). Every malformed Array or reference is a
:class:`ProtocolError` naming it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from flower_split.flower.records import WIRE_NUMPY_DTYPES, WIRE_DTYPES, array_to_tensor, typed_value
from flower_split.protocol import ProtocolError

STATE_FORMAT = 2
"""2: a skeleton may hold views (``{"w": [key, shape, stride, offset]}``); 1 (read too): none."""
STATE_STYPE = "flower_split.raw-le"
"""``Array.stype`` of a party-state tensor: its bytes as they lie in memory, little-endian, with
no NumPy ``.npy`` header. ``Context.state`` is the node's own; a secure party's state is
~100 MB per message at MiniLM size, and the ``.npy`` round trip (a header parse and two copies)
cost 45 % of a secure tenant's handler time (docs/BENCHMARKS.md). Arrays of Flower's own
``numpy.ndarray`` stype (states saved before this format) are read as well."""

STATE_ZEROS_STYPE = "flower_split.zeros"
"""``Array.stype`` of an all-zero integer or bool state tensor: its dtype and shape, no bytes. A
secure party stores a zero share for every value its peer holds (and their masks and pending
products): 45 % of a MiniLM tenant's mid-step state (15.7 of 34.5 MiB), which a simulation ships
through Ray with every message. Floating tensors are always stored whole (``-0.0`` must come back
as ``-0.0``)."""

MAX_STATE_ZEROS = 2**28
"""Most elements a stored zero tensor (or a view, :func:`records_to_state`) may claim (2 GiB of
int64; MiniLM's largest state tensor has about 200,000): a corrupt shape must not allocate the
machine."""


def state_array(name: str, tensor: torch.Tensor) -> Array:
    """A state tensor as an :data:`STATE_STYPE` Array (one copy); bf16 and other dtypes raise."""
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"{name}: dtype {tensor.dtype} cannot be stored (allowed: {', '.join(WIRE_DTYPES.values())})")
    array = tensor.detach().cpu().contiguous().numpy()
    # the first element settles a share (uniform: 0 with probability 2^-64) without a scan
    if not tensor.is_floating_point() and array.size and not array.flat[0] and not array.any():
        return Array(dtype=WIRE_DTYPES[tensor.dtype], shape=tuple(array.shape), stype=STATE_ZEROS_STYPE, data=b"")
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return Array(dtype=WIRE_DTYPES[tensor.dtype], shape=tuple(array.shape), stype=STATE_STYPE, data=data)


def state_tensor(name: str, array: object) -> torch.Tensor:
    """The tensor of a state Array (:data:`STATE_STYPE`, :data:`STATE_ZEROS_STYPE`, or Flower's
    ``.npy`` stype), size checked."""
    if not isinstance(array, Array) or array.stype not in (STATE_STYPE, STATE_ZEROS_STYPE):
        return array_to_tensor(name, array)
    if array.dtype not in WIRE_NUMPY_DTYPES:
        raise ProtocolError(f"{name}: unsupported dtype {array.dtype!r} (allowed: {sorted(WIRE_NUMPY_DTYPES)})")
    dtype = np.dtype(array.dtype).newbyteorder("<")
    shape = tuple(array.shape)
    count = -1  # a malformed dimension (negative, bool, not an int) makes the whole shape invalid
    if all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        count = 1  # exact Python integers: np.prod would wrap on a hostile shape
        for n in shape:
            count *= n
    if array.stype == STATE_ZEROS_STYPE:
        return _state_zeros(name, array, dtype, shape, count)
    if count < 0 or len(array.data) != dtype.itemsize * count:
        raise ProtocolError(f"{name}: {len(array.data)} bytes do not hold {array.dtype}{list(shape)}")
    try:
        values = np.frombuffer(array.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
    except ValueError as exc:  # a shape NumPy cannot hold, even empty
        raise ProtocolError(f"{name}: {array.dtype}{list(shape)}: {exc}") from None
    if dtype.kind == "b" and values.view(np.uint8).max(initial=0) > 1:
        raise ProtocolError(f"{name}: bool bytes other than 0 and 1")
    return torch.from_numpy(values)


def _state_zeros(name: str, array: Array, dtype: np.dtype, shape: tuple, count: int) -> torch.Tensor:
    """The all-zero tensor a :data:`STATE_ZEROS_STYPE` Array stands for (no bytes, a sane shape)."""
    if array.data:
        raise ProtocolError(f"{name}: a zero tensor carries no bytes, got {len(array.data)}")
    if dtype.kind == "f":
        raise ProtocolError(f"{name}: floating tensors are not stored as zeros ({array.dtype})")
    if not 0 < count <= MAX_STATE_ZEROS:
        raise ProtocolError(f"{name}: {array.dtype}{list(shape)} is not a shape of 1 to {MAX_STATE_ZEROS} elements")
    return torch.from_numpy(np.zeros(shape, dtype=dtype.newbyteorder("=")))


ArrayMemo = dict[int, tuple[torch.Tensor, tuple, Array]]
"""The Arrays of a party's last save, by tensor id: ``(tensor, signature, Array)``. A tensor that
is the same object with the same signature (``torch``'s version counter, bumped by every in-place
write through any view of it, and its storage, offset, shape, strides and dtype) holds the same
bytes, so its Array is reused instead of copied again."""


def state_to_records(state: Mapping[str, Any], memo: ArrayMemo | None = None) -> tuple[ArrayRecord, ConfigRecord]:
    """Flatten a nested state (dicts, lists, tuples, scalars, tensors) for ``Context.state``.

    Tensors go into the ArrayRecord under generated keys, byte strings (keys, seeds, CKKS
    contexts of secure mode) into the ConfigRecord as ``b<i>``; the structure, with references
    to those keys, goes into the ConfigRecord as JSON (``"skeleton"``). Dict keys keep their
    type (optimizer states use integer keys). ``memo`` (:data:`ArrayMemo`): the previous save's
    Arrays of a live party, reused for tensors unchanged since; replaced by this save's.

    Shared memory is kept shared: a tensor that is the same memory as one saved before it (the
    same storage, offset, shape and strides), or any view of a tensor saved before it that was
    its storage's whole memory, is saved as a reference to that tensor's key (with the view's
    shape, strides and offset) and comes back as that view of it. A secure party's step holds
    its values, mask shares and openings once and its pending products as views of them, and
    its rollback points hold its halves: a fifth to a third of its state (docs/BENCHMARKS.md).
    """
    arrays = ArrayRecord()
    blobs: dict[str, bytes] = {}
    previous: ArrayMemo = dict(memo) if memo is not None else {}
    if memo is not None:
        memo.clear()
    shared = _Shared(arrays, previous, memo)
    skeleton = json.dumps(_encode(dict(state), "state", shared, blobs))
    return arrays, ConfigRecord({"skeleton": skeleton, "format": STATE_FORMAT, **blobs})


class _Shared:
    """The tensors of one save, by memory: each is stored once, and a later alias or view of a
    whole stored storage is a reference (:func:`state_to_records`)."""

    def __init__(self, arrays: ArrayRecord, previous: ArrayMemo, current: ArrayMemo | None) -> None:
        self.arrays, self.previous, self.current = arrays, previous, current
        self._same: dict[tuple, str] = {}  # (storage, offset, shape, strides, dtype, device) -> key
        self._whole: dict[tuple, str] = {}  # (storage, dtype, device) -> key of a tensor at offset 0 covering it

    def encode(self, path: str, tensor: torch.Tensor) -> dict:
        if tensor.numel() == 0 or tensor.layout != torch.strided:
            return {"t": self._store(path, tensor)}
        # two storages may start at one address (buffers of different lengths): the size is part of the key
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        same = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)
        key = self._same.get(same)
        if key is not None:
            return {"t": key}
        key = self._whole.get((storage, tensor.dtype, tensor.device))
        if key is not None:  # the view's offset in its storage is its offset in that tensor
            return {"w": [key, list(tensor.shape), list(tensor.stride()), tensor.storage_offset()]}
        key = self._same[same] = self._store(path, tensor)
        if (tensor.is_contiguous() and tensor.storage_offset() == 0
                and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()):
            self._whole[(storage, tensor.dtype, tensor.device)] = key
        return {"t": key}

    def _store(self, path: str, tensor: torch.Tensor) -> str:
        key = f"t{len(self.arrays)}"
        self.arrays[key] = _array(path, tensor, self.previous, self.current)
        return key


def _array(path: str, tensor: torch.Tensor, previous: ArrayMemo, current: ArrayMemo | None) -> Array:
    """``tensor``'s Array: the previous save's when the tensor has not changed since."""
    try:
        version = tensor._version  # torch's in-place write counter, shared by every view of the storage
    except RuntimeError:  # an inference-mode tensor keeps no counter: always copied
        return state_array(path, tensor)
    signature = (version, tensor.device, tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.stride(), tensor.dtype)
    hit = previous.get(id(tensor))
    array = hit[2] if hit is not None and hit[0] is tensor and hit[1] == signature else state_array(path, tensor)
    if current is not None:
        current[id(tensor)] = (tensor, signature, array)
    return array


# Module-level recursion on purpose: a recursive closure is a reference cycle that keeps the
# whole state (every tensor or Array of it) alive until Python's cyclic collector runs, which
# in a long-lived Flower client process serving many tenants means gigabytes.
def _encode(value: Any, path: str, shared: _Shared, blobs: dict[str, bytes]) -> Any:
    if isinstance(value, torch.Tensor):
        return shared.encode(path, value)
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"state {path}: dict key {k!r} must be str or int")
            items.append([k, _encode(v, f"{path}.{k}", shared, blobs)])
        return {"d": items}
    if isinstance(value, (list, tuple)):
        tag = "l" if isinstance(value, list) else "u"
        return {tag: [_encode(v, f"{path}[{i}]", shared, blobs) for i, v in enumerate(value)]}
    if isinstance(value, bytes):
        key = f"b{len(blobs)}"
        blobs[key] = value
        return {"b": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    raise TypeError(f"state {path}: cannot store a {type(value).__name__}")


def state_tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a nested state (what :func:`state_to_records` copies at most)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_tensor_bytes(v) for v in value)
    return 0


def records_to_state(arrays: ArrayRecord, config: ConfigRecord) -> dict[str, Any]:
    """Inverse of :func:`state_to_records`: tensors saved once and referred to again come back as
    one tensor (and views of it), as they were."""
    fmt = config.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or not 1 <= fmt <= STATE_FORMAT:
        raise ProtocolError(f"state: format {fmt!r} is not one this flower-split reads (1 to {STATE_FORMAT}): "
                            "saved by a newer version?")
    try:
        return _decode(json.loads(typed_value(config, "skeleton", str, "state")), arrays, config, {})
    except ProtocolError:  # names itself
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"state: malformed skeleton ({type(exc).__name__})") from None


def _decode(node: Any, arrays: ArrayRecord, config: ConfigRecord, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ProtocolError("state: malformed skeleton node")
    (tag, value), = node.items()
    if tag == "t":
        return _tensor(value, arrays, tensors)
    if tag == "w":
        return _view(value, arrays, tensors)
    if tag == "b":
        return typed_value(config, value, bytes, "state")
    if tag == "d":
        return {k: _decode(v, arrays, config, tensors) for k, v in value}
    if tag == "l":
        return [_decode(v, arrays, config, tensors) for v in value]
    if tag == "u":
        return tuple(_decode(v, arrays, config, tensors) for v in value)
    if tag == "v":
        return value
    raise ProtocolError(f"state: unknown skeleton tag {tag!r}")


def _tensor(key: Any, arrays: ArrayRecord, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor stored under ``key``, decoded once however often the skeleton names it."""
    if not isinstance(key, str) or key not in arrays:
        raise ProtocolError(f"state: the skeleton names tensor {key!r}, which the state does not hold")
    if key not in tensors:
        tensors[key] = state_tensor(f"state[{key}]", arrays[key])
    return tensors[key]


def _view(spec: Any, arrays: ArrayRecord, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A view ``[key, shape, strides, offset]`` of a stored tensor, checked to lie inside it."""
    def ints(values: Any) -> bool:
        return isinstance(values, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in values)

    if not (isinstance(spec, list) and len(spec) == 4 and ints(spec[1]) and ints(spec[2])
            and len(spec[1]) == len(spec[2]) and ints([spec[3]])):
        raise ProtocolError(f"state: malformed view {spec!r}")
    key, shape, strides, offset = spec
    if math.prod(shape) > MAX_STATE_ZEROS or any(n > MAX_STATE_ZEROS for n in shape):
        raise ProtocolError(f"state: view {spec!r} claims more than {MAX_STATE_ZEROS} elements")
    base = _tensor(key, arrays, tensors)
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else offset - 1
    if not base.is_contiguous() or last >= base.numel() or any(s > base.numel() for s in strides):
        raise ProtocolError(f"state: view {spec!r} reaches outside tensor {key!r} of {base.numel()} elements")
    return torch.as_strided(base, shape, strides, base.storage_offset() + offset)
