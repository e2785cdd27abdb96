"""Flower transport: protocol messages <-> Flower ``RecordDict``.

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

A party's state in ``Context.state`` is :mod:`flower_split.flower.context_state`'s;
:mod:`flower_split.flower.settings` maps Flower's ``run_config`` onto :class:`RunConfig`.
This layer knows nothing of ring arithmetic.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_split.flower.contract import RecordKey
from flower_split.protocol import BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError

PACK_FORMAT = 2  # 2: f and dL/df at the real tokens, HeadOutput's pool flag
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
WIRE_NUMPY_DTYPES = set(WIRE_DTYPES.values())


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
    if array.dtype not in WIRE_NUMPY_DTYPES:
        raise ProtocolError(f"{name}: unsupported dtype {array.dtype!r} (allowed: {sorted(WIRE_NUMPY_DTYPES)})")
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
