"""Flower transport: protocol messages and party state <-> Flower ``RecordDict``.

One Flower message carries *several* protocol messages of one stage for one tenant (a
"pack"), because a Flower round trip costs ~100 ms in simulation and seconds in deployment.
A pack is a :class:`RecordDict` with two records:

``"protocol"`` (:class:`ConfigRecord`)
    ``format`` (int, :data:`PACK_FORMAT`), ``kind`` (message class name), ``tenant`` (str),
    ``count`` (int), ``steps`` (list of int, one per message) and, for :class:`HeadOutput`,
    ``train`` (list of bool).
``"payload"`` (:class:`ArrayRecord`)
    ``"<i>.<field>"`` for every tensor field of message ``i`` (e.g. ``"0.f"``, ``"0.attention_mask"``).

Replies may add a ``"metrics"`` :class:`MetricRecord` (plain mode only: the client's loss).
Everything is validated on receipt: a missing record or key, a value of the wrong type, an
array of an unsupported dtype or an unexpected extra array raises :class:`ProtocolError`
naming it. Shapes and dtypes of the tensors against the receiver's state are checked by the
parties themselves. bf16 (and any dtype NumPy cannot represent) is refused at packing time.

The same module flattens a party's ``state_dict`` into an ``ArrayRecord`` plus a
``ConfigRecord`` for ``Context.state`` (:func:`state_to_records`, :func:`records_to_state`),
and maps Flower's ``run_config`` onto :class:`RunConfig` plus the Flower-only settings
(:func:`settings_from_run_config`). This layer knows nothing of ring arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_split.config import ConfigError, RunConfig
from flower_split.protocol import BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError

PACK_FORMAT = 1
PROTOCOL_KEY = "protocol"
PAYLOAD_KEY = "payload"
METRICS_KEY = "metrics"

# message class -> (its tensor fields, its per-message boolean fields)
_FIELDS: dict[type[Message], tuple[tuple[str, ...], tuple[str, ...]]] = {
    HeadOutput: (("f", "attention_mask"), ("train",)),
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
            flags[name].append(bool(getattr(message, name)))
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
    header = _record(content, PROTOCOL_KEY, ConfigRecord)
    payload = _record(content, PAYLOAD_KEY, ArrayRecord)
    fmt = _value(header, "format", int)
    if fmt != PACK_FORMAT:
        raise ProtocolError(f"{PROTOCOL_KEY}.format: expected {PACK_FORMAT}, got {fmt}")
    got_kind = _value(header, "kind", str)
    if got_kind != kind.__name__:
        raise ProtocolError(f"{PROTOCOL_KEY}.kind: expected {kind.__name__!r}, got {got_kind!r}")
    got_tenant = _value(header, "tenant", str)
    if tenant is not None and got_tenant != tenant:
        raise ProtocolError(f"{PROTOCOL_KEY}.tenant: expected {tenant!r}, got {got_tenant!r}")
    count = _value(header, "count", int)
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
    return _value(_record(content, PROTOCOL_KEY, ConfigRecord), "tenant", str)


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


def read_config(content: object, key: str = "config") -> ConfigRecord:
    """A server instruction's ConfigRecord (validated presence and type)."""
    if not isinstance(content, RecordDict):
        raise ProtocolError(f"expected a RecordDict, got {type(content).__name__}")
    return _record(content, key, ConfigRecord)


def config_value(record: ConfigRecord, key: str, kind: type, where: str = "config") -> Any:
    """One typed value of a ConfigRecord (ProtocolError if missing or of the wrong type)."""
    return _value(record, key, kind, where)


def _record(content: RecordDict, key: str, kind: type) -> Any:
    if key not in content:
        raise ProtocolError(f"missing {kind.__name__} {key!r} (records present: {sorted(content.keys())})")
    record = content[key]
    if not isinstance(record, kind):
        raise ProtocolError(f"record {key!r}: expected a {kind.__name__}, got {type(record).__name__}")
    return record


def _value(record: ConfigRecord, key: str, kind: type, where: str = PROTOCOL_KEY) -> Any:
    if key not in record:
        raise ProtocolError(f"{where}: missing key {key!r}")
    value = record[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ProtocolError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _int_list(record: ConfigRecord, key: str, count: int) -> list[int]:
    values = _value(record, key, list)
    if len(values) != count or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError(f"{PROTOCOL_KEY}.{key}: expected {count} integers, got {values!r}")
    return list(values)


def _bool_list(record: ConfigRecord, key: str, count: int) -> list[bool]:
    values = _value(record, key, list)
    if len(values) != count or not all(isinstance(v, bool) for v in values):
        raise ProtocolError(f"{PROTOCOL_KEY}.{key}: expected {count} booleans, got {values!r}")
    return list(values)


# ---------------------------------------------------------------------------------------------
# party state <-> (ArrayRecord, ConfigRecord) for Context.state


def state_to_records(state: Mapping[str, Any]) -> tuple[ArrayRecord, ConfigRecord]:
    """Flatten a nested state (dicts, lists, tuples, scalars, tensors) for ``Context.state``.

    Tensors go into the ArrayRecord under generated keys, byte strings (keys, seeds, CKKS
    contexts of secure mode) into the ConfigRecord as ``b<i>``; the structure, with references
    to those keys, goes into the ConfigRecord as JSON (``"skeleton"``). Dict keys keep their
    type (optimizer states use integer keys).
    """
    arrays = ArrayRecord()
    blobs: dict[str, bytes] = {}
    skeleton = json.dumps(_encode(dict(state), "state", arrays, blobs))
    return arrays, ConfigRecord({"skeleton": skeleton, "format": PACK_FORMAT, **blobs})


# Module-level recursion on purpose: a recursive closure is a reference cycle that keeps the
# whole state (every tensor or Array of it) alive until Python's cyclic collector runs, which
# in a long-lived Flower client process serving many tenants means gigabytes.
def _encode(value: Any, path: str, arrays: ArrayRecord, blobs: dict[str, bytes]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(arrays)}"
        arrays[key] = tensor_to_array(path, value)
        return {"t": key}
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"state {path}: dict key {k!r} must be str or int")
            items.append([k, _encode(v, f"{path}.{k}", arrays, blobs)])
        return {"d": items}
    if isinstance(value, (list, tuple)):
        tag = "l" if isinstance(value, list) else "u"
        return {tag: [_encode(v, f"{path}[{i}]", arrays, blobs) for i, v in enumerate(value)]}
    if isinstance(value, bytes):
        key = f"b{len(blobs)}"
        blobs[key] = value
        return {"b": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    raise TypeError(f"state {path}: cannot store a {type(value).__name__}")


def records_to_state(arrays: ArrayRecord, config: ConfigRecord) -> dict[str, Any]:
    """Inverse of :func:`state_to_records`."""
    skeleton = json.loads(_value(config, "skeleton", str, "state"))
    return _decode(skeleton, arrays, config)


def _decode(node: Any, arrays: ArrayRecord, config: ConfigRecord) -> Any:
    (tag, value), = node.items()
    if tag == "t":
        return array_to_tensor(f"state[{value}]", arrays[value])
    if tag == "b":
        return _value(config, value, bytes, "state")
    if tag == "d":
        return {k: _decode(v, arrays, config) for k, v in value}
    if tag == "l":
        return [_decode(v, arrays, config) for v in value]
    if tag == "u":
        return tuple(_decode(v, arrays, config) for v in value)
    return value


# ---------------------------------------------------------------------------------------------
# Flower run_config -> RunConfig + Flower-only settings


@dataclass
class FlowerSettings:
    """Settings of a Flower run that are not part of :class:`RunConfig`.

    ``run_config`` keys (dashes): ``num-server-rounds``, ``local-steps`` (micro-batches each
    tenant trains per round), ``micro-batches`` (micro-batches carried per Flower message),
    ``partition`` (``iid``, ``dirichlet:A``, ``shards:N``), ``min-nodes`` (tenants needed to
    start), ``reply-timeout`` (seconds to wait for a stage's replies; tenants later than that
    are dropped from the round), ``eval-every`` (evaluate every N rounds; 0: only at the end),
    ``eval-initial`` (also evaluate before the first round), ``global-eval`` (after the last
    round, also evaluate every tenant on the whole test set; split only), ``secure-metrics``
    (secure mode: tenants report their evaluation counts, from logits opened to them only, to
    the strategy; false: they report none. Never a training loss, see docs/secure.md §9),
    ``he-key-rotation-every`` (secure mode with ``he`` label protection: every tenant gets a
    new CKKS key pair after every N training rounds; 0: never; any other mode refuses N > 0),
    ``cloud-keep-graphs`` (both modes: the cloud keeps each in-flight step's autograd graph,
    about 200 MB per 32-row MiniLM micro-batch, instead of running the body forward again when
    the gradient arrives; faster, but memory grows with tenants x micro-batches),
    ``allow-insecure-reproducible-init`` (secure mode, the cloud: accept tenants whose adapters
    start from the public seed, ``insecure-reproducible-init``; benchmarks only, default false),
    ``quick`` (tiny model on a few hundred samples and short rounds, see ``flower_split.cli.QUICK``
    and ``QUICK_FLOWER``).
    """

    num_server_rounds: int = 3
    local_steps: int = 50
    micro_batches: int = 8
    partition: str = "dirichlet:0.5"
    min_nodes: int = 2
    reply_timeout: float = 600.0
    eval_every: int = 1
    eval_initial: bool = False
    global_eval: bool = True
    secure_metrics: bool = True
    he_key_rotation_every: int = 0
    cloud_keep_graphs: bool = False
    allow_insecure_reproducible_init: bool = False
    quick: bool = False

    def validate(self) -> "FlowerSettings":
        for name in ("num_server_rounds", "local_steps", "micro_batches", "min_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')}: expected a positive integer, got {value!r}")
        for name in ("eval_every", "he_key_rotation_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name.replace('_', '-')}: expected an integer >= 0, got {value!r}")
        if isinstance(self.reply_timeout, bool) or not isinstance(self.reply_timeout, (int, float)) \
                or self.reply_timeout <= 0:
            raise ConfigError(f"reply-timeout: expected a positive number of seconds, got {self.reply_timeout!r}")
        for name in ("eval_initial", "global_eval", "secure_metrics", "cloud_keep_graphs",
                     "allow_insecure_reproducible_init", "quick"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name.replace('_', '-')}: expected true or false, got {getattr(self, name)!r}")
        if not isinstance(self.partition, str):
            raise ConfigError(f"partition: expected a string, got {self.partition!r}")
        from flower_split.data import make_partitioner  # validates the spec's syntax

        make_partitioner(self.partition, 2, 0)
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps each tenant takes over the whole run (for the LR schedule)."""
        return self.num_server_rounds * self.local_steps


def settings_from_run_config(values: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings]:
    """Split Flower's ``run_config`` into a validated :class:`RunConfig` and :class:`FlowerSettings`.

    Keys may use dashes or underscores; unknown keys are an error naming the key. The
    Flower apps run ``mode='split'`` (``security`` 'plain' or 'secure').
    """
    from flower_split.cli import QUICK, QUICK_FLOWER

    flower_fields = {f.name for f in dataclasses.fields(FlowerSettings)}
    run: dict[str, Any] = {}
    flower: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        (flower if name in flower_fields else run)[name] = value
    quick = flower.get("quick", False)
    if quick is True:  # applied last so that `--run-config quick=true` wins over pyproject defaults
        run.update({k: v for k, v in QUICK.items() if k != "epochs"})
        flower.update(QUICK_FLOWER)
    settings = FlowerSettings(**flower).validate()
    config = RunConfig.from_mapping(run)
    if config.mode != "split":
        raise ConfigError(f"mode: the Flower app runs 'split' only, got {config.mode!r}")
    if settings.he_key_rotation_every and (config.security, config.label_protection) != ("secure", "he"):
        raise ConfigError(f"he-key-rotation-every: only security 'secure' with label-protection 'he' has CKKS "
                          f"keys to rotate (this run: security {config.security!r}, label-protection "
                          f"{config.label_protection!r}); set it to 0")
    if config.security == "secure" and config.insecure_reproducible_init \
            and not settings.allow_insecure_reproducible_init:
        raise ConfigError("insecure-reproducible-init: the cloud refuses tenants whose head starts from a public "
                          "seed unless allow-insecure-reproducible-init = true (benchmarks only)")
    return config, settings
