"""Flower transport: protocol messages and party state <-> Flower ``RecordDict``.

One Flower message carries *several* protocol messages of one stage for one tenant (a
"pack"), because a Flower round trip costs ~100 ms in simulation and seconds in deployment.
A pack is a :class:`RecordDict` with two records:

``"protocol"`` (:class:`ConfigRecord`)
    ``format`` (int, :data:`PACK_FORMAT`), ``kind`` (message class name), ``tenant`` (str),
    ``count`` (int), ``steps`` (list of int, one per message) and, for :class:`HeadOutput`,
    ``train`` and ``pool`` (lists of bool).
``"payload"`` (:class:`ArrayRecord`)
    ``"<i>.<field>"`` for every tensor field of message ``i`` (e.g. ``"0.f"``, ``"0.attention_mask"``).

Replies may add a ``"metrics"`` :class:`MetricRecord` (plain mode only: the client's loss).
Everything is validated on receipt: a missing record or key, a value of the wrong type, an
array of an unsupported dtype or an unexpected extra array raises :class:`ProtocolError`
naming it. Shapes and dtypes of the tensors against the receiver's state are checked by the
parties themselves. bf16 (and any dtype NumPy cannot represent) is refused at packing time.

The same module flattens a party's ``state_dict`` into an ``ArrayRecord`` plus a
``ConfigRecord`` for ``Context.state`` (:func:`state_to_records`, :func:`records_to_state`),
(:mod:`flower_split.flower.settings` maps Flower's ``run_config`` onto :class:`RunConfig`).
This layer knows nothing of ring arithmetic.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_split.flower.contract import RecordKey
from flower_split.protocol import BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError

PACK_FORMAT = 2  # 2: f and dL/df at the real tokens, HeadOutput's pool flag
STATE_FORMAT = 1
PROTOCOL_KEY = RecordKey.PROTOCOL
PAYLOAD_KEY = RecordKey.PAYLOAD
METRICS_KEY = RecordKey.METRICS

# message class -> (its tensor fields, its per-message boolean fields)
_FIELDS: dict[type[Message], tuple[tuple[str, ...], tuple[str, ...]]] = {
    HeadOutput: (("f", "attention_mask"), ("train", "pool")),
    BodyOutput: (("h",), ()),
    BodyGrad: (("grad_h",), ()),
    HeadGrad: (("grad_f",), ()),
}
_KINDS: dict[str, type[Message]] = {cls.__name__: cls for cls in _FIELDS}

# dtypes that may travel; bf16 has no NumPy equivalent and is refused (cast to float32 first)
WIRE_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32", torch.float64: "float64", torch.int64: "int64",
    torch.int32: "int32", torch.bool: "bool",
}
_NUMPY_DTYPES = set(WIRE_DTYPES.values())


# ---------------------------------------------------------------------------------------------
# tensors <-> Array


def tensor_to_array(name: str, tensor: torch.Tensor) -> Array:
    """A tensor as a Flower :class:`Array`; unsupported dtypes (bf16, ...) raise ProtocolError."""
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in WIRE_DTYPES:
        raise ProtocolError(
            f"{name}: dtype {tensor.dtype} cannot travel in a Flower ArrayRecord "
            f"(allowed: {', '.join(WIRE_DTYPES.values())}); convert it, e.g. to float32"
        )
    return Array(np.ascontiguousarray(tensor.detach().cpu().numpy()))


def array_to_tensor(name: str, array: object) -> torch.Tensor:
    """The tensor inside a received :class:`Array`, after checking its type and dtype."""
    if not isinstance(array, Array):
        raise ProtocolError(f"{name}: expected a Flower Array, got {type(array).__name__}")
    if array.dtype not in _NUMPY_DTYPES:
        raise ProtocolError(f"{name}: unsupported dtype {array.dtype!r} (allowed: {sorted(_NUMPY_DTYPES)})")
    try:
        ndarray = array.numpy()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{name}: cannot decode the array ({exc})") from None
    if str(ndarray.dtype) != array.dtype or tuple(ndarray.shape) != tuple(array.shape):
        raise ProtocolError(f"{name}: array header says {array.dtype}{list(array.shape)}, "
                            f"data is {ndarray.dtype}{list(ndarray.shape)}")
    return torch.from_numpy(np.array(ndarray, copy=True))


# ---------------------------------------------------------------------------------------------
# protocol messages <-> RecordDict


def pack_messages(kind: type[Message], tenant: str, messages: Sequence[Message],
                  metrics: Mapping[str, int | float] | None = None) -> RecordDict:
    """Pack protocol messages of one ``kind`` for one ``tenant`` (possibly none) into a RecordDict."""
    if kind not in _FIELDS:
        raise ValueError(f"kind: {kind!r} is not a protocol message class")
    tensor_fields, flag_fields = _FIELDS[kind]
    payload = ArrayRecord()
    steps: list[int] = []
    flags: dict[str, list[bool]] = {name: [] for name in flag_fields}
    for i, message in enumerate(messages):
        if type(message) is not kind:
            raise ValueError(f"message {i}: expected {kind.__name__}, got {type(message).__name__}")
        if message.tenant != tenant:
            raise ValueError(f"message {i}: tenant {message.tenant!r} in a pack for {tenant!r}")
        steps.append(int(message.step))
        for name in flag_fields:
            flag = getattr(message, name)
            if not isinstance(flag, bool):  # bool("no") is True: a flag is packed as given or not at all
                raise ValueError(f"message {i}: {name} must be a bool, got {type(flag).__name__}")
            flags[name].append(flag)
        for name in tensor_fields:
            payload[f"{i}.{name}"] = tensor_to_array(f"{kind.__name__}[{i}].{name}", getattr(message, name))
    header = ConfigRecord({"format": PACK_FORMAT, "kind": kind.__name__, "tenant": tenant,
                           "count": len(steps), "steps": steps, **flags})
    content = RecordDict({PROTOCOL_KEY: header, PAYLOAD_KEY: payload})
    if metrics is not None:
        content[METRICS_KEY] = MetricRecord(dict(metrics))
    return content


def unpack_messages(content: object, kind: type[Message], tenant: str | None = None) -> list[Message]:
    """Validate a received pack and return its messages (in order).

    ``kind`` is the message class the receiver expects at this stage; ``tenant``, if given, the
    only tenant it accepts. Any deviation raises :class:`ProtocolError` with the reason.
    """
    if kind not in _FIELDS:
        raise ValueError(f"kind: {kind!r} is not a protocol message class")
    if not isinstance(content, RecordDict):
        raise ProtocolError(f"expected a RecordDict, got {type(content).__name__}")
    header = read_record(content, PROTOCOL_KEY, ConfigRecord)
    payload = read_record(content, PAYLOAD_KEY, ArrayRecord)
    fmt = typed_value(header, "format", int)
    if fmt != PACK_FORMAT:
        raise ProtocolError(f"{PROTOCOL_KEY}.format: expected {PACK_FORMAT}, got {fmt}")
    got_kind = typed_value(header, "kind", str)
    if got_kind != kind.__name__:
        raise ProtocolError(f"{PROTOCOL_KEY}.kind: expected {kind.__name__!r}, got {got_kind!r}")
    got_tenant = typed_value(header, "tenant", str)
    if tenant is not None and got_tenant != tenant:
        raise ProtocolError(f"{PROTOCOL_KEY}.tenant: expected {tenant!r}, got {got_tenant!r}")
    count = typed_value(header, "count", int)
    if count < 0:
        raise ProtocolError(f"{PROTOCOL_KEY}.count: must be >= 0, got {count}")
    steps = _int_list(header, "steps", count)
    tensor_fields, flag_fields = _FIELDS[kind]
    flags = {name: _bool_list(header, name, count) for name in flag_fields}
    expected = {f"{i}.{name}" for i in range(count) for name in tensor_fields}
    extra = sorted(set(payload.keys()) - expected)
    if extra:
        raise ProtocolError(f"{PAYLOAD_KEY}: unexpected arrays {extra[:5]} for {count} {kind.__name__} message(s)")
    messages: list[Message] = []
    for i, step in enumerate(steps):
        values: dict[str, Any] = {name: flags[name][i] for name in flag_fields}
        for name in tensor_fields:
            key = f"{i}.{name}"
            if key not in payload:
                raise ProtocolError(f"{PAYLOAD_KEY}: missing array {key!r} ({kind.__name__} {i} of {count})")
            values[name] = array_to_tensor(f"{kind.__name__}[{i}].{name}", payload[key])
        messages.append(kind(tenant=got_tenant, step=step, **values))
    return messages


def pack_tenant(content: RecordDict) -> str:
    """The tenant named in a pack's header (validated)."""
    return typed_value(read_record(content, PROTOCOL_KEY, ConfigRecord), "tenant", str)


def read_metrics(content: RecordDict, required: Sequence[str] = (),
                 lists: Sequence[str] = ()) -> dict[str, float]:
    """The scalar values of a reply's optional ``"metrics"`` record, ``required`` keys checked.

    Keys named in ``lists`` may hold lists of numbers (read them from the record itself);
    any other non-scalar value is a :class:`ProtocolError`.
    """
    record = content.get(METRICS_KEY) if isinstance(content, RecordDict) else None
    if record is None:
        if required:
            raise ProtocolError(f"missing MetricRecord {METRICS_KEY!r} (needs {list(required)})")
        return {}
    if not isinstance(record, MetricRecord):
        raise ProtocolError(f"record {METRICS_KEY!r}: expected a MetricRecord, got {type(record).__name__}")
    for key in required:
        if key not in record:
            raise ProtocolError(f"{METRICS_KEY}: missing key {key!r}")
    values: dict[str, float] = {}
    for key, value in record.items():
        if key in lists and isinstance(value, list):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{METRICS_KEY}.{key}: expected a number, got {type(value).__name__}")
        values[key] = float(value)
    return values


def read_config(content: object, key: str = RecordKey.CONFIG) -> ConfigRecord:
    """A server instruction's ConfigRecord (validated presence and type)."""
    if not isinstance(content, RecordDict):
        raise ProtocolError(f"expected a RecordDict, got {type(content).__name__}")
    return read_record(content, key, ConfigRecord)


def config_value(record: ConfigRecord, key: str, kind: type, where: str = "config") -> Any:
    """One typed value of a ConfigRecord (ProtocolError if missing or of the wrong type)."""
    return typed_value(record, key, kind, where)


def read_record(content: object, key: str, kind: type) -> Any:
    """The record ``key`` of a received RecordDict, of type ``kind`` (ProtocolError naming what is wrong)."""
    if not isinstance(content, RecordDict):
        raise ProtocolError(f"expected a RecordDict, got {type(content).__name__}")
    if key not in content:
        raise ProtocolError(f"missing {kind.__name__} {key!r} (records present: {sorted(content.keys())})")
    record = content[key]
    if not isinstance(record, kind):
        raise ProtocolError(f"record {key!r}: expected a {kind.__name__}, got {type(record).__name__}")
    return record


def typed_value(record: ConfigRecord, key: str, kind: type, where: str = PROTOCOL_KEY) -> Any:
    """One typed value of a received record (ProtocolError if missing or of the wrong type)."""
    if key not in record:
        raise ProtocolError(f"{where}: missing key {key!r}")
    value = record[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ProtocolError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _int_list(record: ConfigRecord, key: str, count: int) -> list[int]:
    values = typed_value(record, key, list)
    if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError(f"{PROTOCOL_KEY}.{key}: expected {count} integers, got {values!r}")
    return list(values)


def _bool_list(record: ConfigRecord, key: str, count: int) -> list[bool]:
    values = typed_value(record, key, list)
    if len(values) != count or not all(isinstance(v, bool) for v in values):
        raise ProtocolError(f"{PROTOCOL_KEY}.{key}: expected {count} booleans, got {values!r}")
    return list(values)


# ---------------------------------------------------------------------------------------------
# party state <-> (ArrayRecord, ConfigRecord) for Context.state

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
"""Most elements a stored zero tensor may claim (2 GiB of int64; MiniLM's largest state tensor has
about 200,000): a corrupt shape must not allocate the machine."""


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
    if array.dtype not in _NUMPY_DTYPES:
        raise ProtocolError(f"{name}: unsupported dtype {array.dtype!r} (allowed: {sorted(_NUMPY_DTYPES)})")
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
    """
    arrays = ArrayRecord()
    blobs: dict[str, bytes] = {}
    previous: ArrayMemo = dict(memo) if memo is not None else {}
    if memo is not None:
        memo.clear()
    skeleton = json.dumps(_encode(dict(state), "state", arrays, blobs, previous, memo))
    return arrays, ConfigRecord({"skeleton": skeleton, "format": STATE_FORMAT, **blobs})


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
def _encode(value: Any, path: str, arrays: ArrayRecord, blobs: dict[str, bytes], previous: ArrayMemo,
            current: ArrayMemo | None) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(arrays)}"
        arrays[key] = _array(path, value, previous, current)
        return {"t": key}
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"state {path}: dict key {k!r} must be str or int")
            items.append([k, _encode(v, f"{path}.{k}", arrays, blobs, previous, current)])
        return {"d": items}
    if isinstance(value, (list, tuple)):
        tag = "l" if isinstance(value, list) else "u"
        return {tag: [_encode(v, f"{path}[{i}]", arrays, blobs, previous, current) for i, v in enumerate(value)]}
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
    """Inverse of :func:`state_to_records`."""
    skeleton = json.loads(typed_value(config, "skeleton", str, "state"))
    return _decode(skeleton, arrays, config)


def _decode(node: Any, arrays: ArrayRecord, config: ConfigRecord) -> Any:
    (tag, value), = node.items()
    if tag == "t":
        return state_tensor(f"state[{value}]", arrays[value])
    if tag == "b":
        return typed_value(config, value, bytes, "state")
    if tag == "d":
        return {k: _decode(v, arrays, config) for k, v in value}
    if tag == "l":
        return [_decode(v, arrays, config) for v in value]
    if tag == "u":
        return tuple(_decode(v, arrays, config) for v in value)
    return value
