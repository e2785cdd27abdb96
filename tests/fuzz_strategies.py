"""Mutations of protocol messages, shared by the fuzz tests and ``simulations/fuzz_messages.py``.

A :class:`Mutation` is three numbers: which kind of change (``kind``, taken modulo the kinds
that apply to the message), where (``pick``: which field, item, key or element, modulo the
candidates) and a parameter (``arg``: a size, an offset, an index into a list of choices).
:func:`mutate` applies it to any message the parties exchange: the dataclasses of
``flower_split.protocol`` (plain and secure, set-up included), the dicts, ints and bytes
that travel as instructions (update counts, next step, key ids), and Flower ``RecordDict``
contents (records, config values, arrays, their raw bytes). It returns the mutated copy and a
short description, or None when the kind finds nothing to change.

Values that are arbitrary by design are not mutated in value, only in type and structure:
a different 32-byte seed, or other ring values of the right shape, is a well-formed message
that a semi-honest protocol accepts (docs/secure.md section 2: nothing detects a deviating
party). The harness names those slots (``free``).

Hypothesis draws mutations with :func:`mutations`; the long script draws them with
:func:`random_mutation` from a ``random.Random``. Both produce the same :class:`Mutation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

try:  # the long script runs without hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

SPECIAL_INTS = (-1, 0, 1, 2**31, 2**62, 2**63 - 1, 2**64, -(2**63), 10**30)
ODD_VALUES = (None, 1.5, "1", b"\x01", [1], {"a": 1}, True, float("nan"))
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int32, torch.int64,
          torch.uint8, torch.bool, torch.complex64)


@dataclass(frozen=True)
class Mutation:
    kind: int
    pick: int
    arg: int


# ---------------------------------------------------------------------------------------------
# slots: where a message holds a value


@dataclass(frozen=True)
class Slot:
    path: tuple[Any, ...]
    value: Any
    name: str


def _children(value: Any) -> list[tuple[Any, Any]]:
    """(key, child) of a container value: dataclass fields, dict items, sequence elements."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    if _is_record_dict(value):
        return [(k, v) for k, v in value.items()]
    if _is_record(value):
        return [(k, v) for k, v in value.items()]
    return []


def slots(message: Any, path: tuple[Any, ...] = ()) -> list[Slot]:
    """Every value inside ``message`` (containers included), depth first."""
    out = [Slot(path, message, "/".join(map(str, path)) or "<message>")]
    if isinstance(message, (str, bytes, torch.Tensor)) or _is_array(message):
        return out
    for key, child in _children(message):
        out += slots(child, path + (key,))
    return out


def replace_at(message: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``message`` with the value at ``path`` replaced (containers copied on the way)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return dataclasses.replace(message, **{key: replace_at(getattr(message, key), rest, value)})
    if isinstance(message, dict):
        return {**message, key: replace_at(message[key], rest, value)}
    if isinstance(message, (list, tuple)):
        items = list(message)
        items[key] = replace_at(items[key], rest, value)
        return type(message)(items) if isinstance(message, tuple) else items
    if _is_record_dict(message) or _is_record(message):
        copy = _copy_record(message)
        copy[key] = replace_at(message[key], rest, value)
        return copy
    raise TypeError(f"cannot descend into {type(message).__name__}")


# ---------------------------------------------------------------------------------------------
# Flower records (imported lazily: the protocol tests need no flwr)


def _flwr() -> Any:
    import flwr.app

    return flwr.app


def _is_record_dict(value: Any) -> bool:
    return type(value).__name__ == "RecordDict"


def _is_record(value: Any) -> bool:
    return type(value).__name__ in ("ConfigRecord", "ArrayRecord", "MetricRecord")


def _is_array(value: Any) -> bool:
    return type(value).__name__ == "Array" and hasattr(value, "data")


def _copy_record(record: Any) -> Any:
    app = _flwr()
    if _is_record_dict(record):
        return app.RecordDict({k: v for k, v in record.items()})
    cls = type(record)
    copy = cls()
    for k, v in record.items():
        copy[k] = v
    return copy


# ---------------------------------------------------------------------------------------------
# value mutators: each takes (value, arg) and returns a new value, or None when it does not apply


def _tensor(fn: Callable[[torch.Tensor, int], Any]) -> Callable[[Any, int], Any]:
    return lambda v, a: fn(v, a) if isinstance(v, torch.Tensor) and v.layout == torch.strided \
        and v.device.type == "cpu" else None


def _dim(t: torch.Tensor, arg: int) -> int:
    return arg % t.dim() if t.dim() else 0


def _grow(t: torch.Tensor, arg: int) -> torch.Tensor | None:
    if not t.dim():
        return None
    dim = _dim(t, arg)
    extra = t.narrow(dim, 0, min(1, t.shape[dim])) if t.shape[dim] else None
    return torch.cat([t, extra if extra is not None else torch.zeros_like(t)], dim) if extra is not None else None


def _truncate(t: torch.Tensor, arg: int) -> torch.Tensor | None:
    if not t.dim() or not t.shape[_dim(t, arg)]:
        return None
    dim = _dim(t, arg)
    keep = (arg // 7) % t.shape[dim]  # 0 .. size-1 rows along dim
    return t.narrow(dim, 0, keep).clone()


def _set_element(t: torch.Tensor, arg: int, value: Any) -> torch.Tensor | None:
    if not t.numel():
        return None
    out = t.clone().reshape(-1)
    out[arg % out.numel()] = value
    return out.reshape(t.shape)


def _extreme(t: torch.Tensor, arg: int) -> torch.Tensor | None:
    if t.is_floating_point():
        return _set_element(t, arg, (1e30, -3e38, 65504.0)[arg % 3])
    if t.dtype == torch.int64:
        return _set_element(t, arg, (2**63 - 1, -(2**63), 2**40)[arg % 3])
    return None


def _non_contiguous(t: torch.Tensor, arg: int) -> torch.Tensor | None:
    if not t.dim():
        return None
    return t.unsqueeze(-1).expand(*t.shape, 2)[..., arg % 2]  # same values, stride 0 on a new axis


def _sparse(t: torch.Tensor, arg: int) -> torch.Tensor | None:
    if not t.dim():
        return None
    return t.to_sparse() if arg % 2 or t.dim() != 2 else t.to_sparse_csr()


def _not_tensor(t: torch.Tensor, arg: int) -> Any:
    t = t.detach()
    return (t.tolist(), t.numpy().copy(), None, t.numpy().tobytes())[arg % 4]


def _requires_grad(t: torch.Tensor, arg: int) -> torch.Tensor | None:
    return t.detach().clone().requires_grad_(True) if t.is_floating_point() else None


def _perturb(t: torch.Tensor, arg: int) -> torch.Tensor | None:
    """Other finite float values (well-formed data: plain mode trains on whatever it is sent)."""
    if not t.is_floating_point() or not t.numel():
        return None
    generator = torch.Generator().manual_seed(arg)
    return t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * (10.0 ** (arg % 5 - 2))


TENSOR_KINDS: dict[str, Callable[[Any, int], Any]] = {
    "tensor.grow": _tensor(_grow),
    "tensor.truncate": _tensor(_truncate),
    "tensor.flatten": _tensor(lambda t, a: t.reshape(-1) if t.dim() > 1 else None),
    "tensor.unsqueeze": _tensor(lambda t, a: t.unsqueeze(a % (t.dim() + 1))),
    "tensor.scalar": _tensor(lambda t, a: t.reshape(-1)[0].clone() if t.numel() else torch.tensor(0)),
    "tensor.empty": _tensor(lambda t, a: t.narrow(_dim(t, a), 0, 0).clone() if t.dim() else None),
    "tensor.dtype": _tensor(lambda t, a: _cast(t, DTYPES[a % len(DTYPES)])),
    "tensor.meta": _tensor(lambda t, a: t.to("meta")),
    "tensor.sparse": _tensor(_sparse),
    "tensor.noncontiguous": _tensor(_non_contiguous),
    "tensor.nan": _tensor(lambda t, a: _set_element(t, a, float("nan")) if t.is_floating_point() else None),
    "tensor.inf": _tensor(lambda t, a: _set_element(t, a, (math.inf, -math.inf)[a % 2])
                          if t.is_floating_point() else None),
    "tensor.extreme": _tensor(_extreme),
    "tensor.requires_grad": _tensor(_requires_grad),
    "tensor.not_tensor": _tensor(_not_tensor),
}
VALUE_KINDS = {"tensor.extreme", "tensor.perturb"}
"""Kinds that change values but keep type and shape (skipped on ``free`` slots)."""
TENSOR_KINDS["tensor.perturb"] = _tensor(_perturb)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t.dtype == dtype else t.to(dtype)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


SCALAR_KINDS: dict[str, Callable[[Any, int], Any]] = {
    "int.shift": lambda v, a: v + (1, -1, 2, 1024, -1024)[a % 5] if _is_int(v) else None,
    "int.special": lambda v, a: SPECIAL_INTS[a % len(SPECIAL_INTS)] if _is_int(v) else None,
    "int.type": lambda v, a: (True, float(v), str(v), None, np.int64(v % 2**62))[a % 5] if _is_int(v) else None,
    "bool.flip": lambda v, a: (not v) if isinstance(v, bool) else None,
    "bool.type": lambda v, a: (int(v), "true", None, 1.0)[a % 4] if isinstance(v, bool) else None,
    "float.special": lambda v, a: (math.nan, math.inf, -math.inf, -1.0, 0.0, 1e300)[a % 6]
    if isinstance(v, float) else None,
    "float.type": lambda v, a: (str(v), None, [v], True)[a % 4] if isinstance(v, float) else None,
    "str.other": lambda v, a: (v + "x", v[:-1], v.upper(), " " + v, "")[a % 5] if isinstance(v, str) else None,
    "str.type": lambda v, a: (v.encode(), 0, None, [v])[a % 4] if isinstance(v, str) else None,
    "str.long": lambda v, a: v * (1 + 4096 // max(1, len(v))) if isinstance(v, str) else None,
    "bytes.truncate": lambda v, a: v[: a % len(v)] if isinstance(v, bytes) and v else None,
    "bytes.extend": lambda v, a: v + bytes([a % 256]) * (1 + a % 33) if isinstance(v, bytes) else None,
    "bytes.flip": lambda v, a: _flip(v, a) if isinstance(v, bytes) and v else None,
    "bytes.type": lambda v, a: (bytearray(v), v.hex(), None, list(v[:4]))[a % 4] if isinstance(v, bytes) else None,
    "seq.length": lambda v, a: _seq_length(v, a),
    "seq.type": lambda v, a: (list(v) if isinstance(v, tuple) else tuple(v), str(v), None)[a % 3]
    if isinstance(v, (list, tuple)) else None,
    "dict.drop": lambda v, a: _dict_drop(v, a),
    "dict.extra": lambda v, a: _dict_extra(v, a),
    "dict.type": lambda v, a: (list(v.items()), None, str(v))[a % 3] if isinstance(v, dict) else None,
    "value.odd": lambda v, a: ODD_VALUES[a % len(ODD_VALUES)],
}
VALUE_KINDS |= {"bytes.flip", "float.special", "int.shift", "int.special", "bool.flip", "str.other"}


def _flip(v: bytes, a: int) -> bytes:
    data = bytearray(v)
    data[a % len(data)] ^= 1 << (a // 7 % 8)
    return bytes(data)


def _seq_length(v: Any, a: int) -> Any:
    if not isinstance(v, (list, tuple)):
        return None
    items = list(v[:-1]) if a % 2 and v else list(v) + ([v[-1]] if v else [0])
    return type(v)(items)


def _dict_drop(v: Any, a: int) -> Any:
    if not isinstance(v, dict) or not v:
        return None
    keys = sorted(v, key=str)
    return {k: x for k, x in v.items() if k != keys[a % len(keys)]}


def _dict_extra(v: Any, a: int) -> Any:
    if not isinstance(v, dict):
        return None
    some = next(iter(v.values()), 0)
    return {**v, f"extra{a % 3}": some}


# ---------------------------------------------------------------------------------------------
# Flower records: keys deleted or added, arrays with other bytes, dtype or shape headers


def _array_kinds() -> dict[str, Callable[[Any, int], Any]]:
    def rewrite(fn: Callable[[Any, int], Any]) -> Callable[[Any, int], Any]:
        return lambda v, a: fn(v, a) if _is_array(v) else None

    def with_data(v: Any, data: bytes) -> Any:
        return _flwr().Array(dtype=v.dtype, shape=tuple(v.shape), stype=v.stype, data=data)

    def with_header(v: Any, a: int) -> Any:
        dtypes = ("float32", "int64", "float16", "int8", "object", "<U5", "bool")
        shape = list(v.shape)
        if a % 2 and shape:
            shape[a % len(shape)] += 1
            return _flwr().Array(dtype=v.dtype, shape=tuple(shape), stype=v.stype, data=v.data)
        return _flwr().Array(dtype=dtypes[a % len(dtypes)], shape=tuple(shape), stype=v.stype, data=v.data)

    return {
        "array.truncate": rewrite(lambda v, a: with_data(v, v.data[: (a % max(1, len(v.data)))])),
        "array.garbage": rewrite(lambda v, a: with_data(v, bytes([a % 256]) * (1 + a % 64))),
        "array.header": rewrite(with_header),
        "array.stype": rewrite(lambda v, a: _flwr().Array(dtype=v.dtype, shape=tuple(v.shape), stype="torch.raw",
                                                         data=v.data)),
    }


def _record_kinds() -> dict[str, Callable[[Any, int], Any]]:
    def drop(v: Any, a: int) -> Any:
        if not (_is_record(v) or _is_record_dict(v)) or not len(v):
            return None
        copy, keys = _copy_record(v), sorted(v.keys())
        del copy[keys[a % len(keys)]]
        return copy

    def extra(v: Any, a: int) -> Any:
        if not (_is_record(v) or _is_record_dict(v)):
            return None
        copy = _copy_record(v)
        app = _flwr()
        if _is_record_dict(v):
            copy[f"extra{a % 3}"] = app.ConfigRecord({"x": 1})
        elif isinstance(v, app.ArrayRecord):
            copy[f"extra{a % 3}"] = app.Array(np.zeros(2, dtype=np.int64))
        else:
            copy[f"extra{a % 3}"] = (1, "x", b"y", 1.5)[a % 4]
        return copy

    def swap_kind(v: Any, a: int) -> Any:
        """A record of another type under the same key (a ConfigRecord where an ArrayRecord belongs ...)."""
        if not _is_record(v):
            return None
        app = _flwr()
        others = [app.ConfigRecord({"x": 1}), app.ArrayRecord(), app.MetricRecord({"x": 1.0})]
        return [o for o in others if type(o) is not type(v)][a % 2]

    return {"record.drop": drop, "record.extra": extra, "record.swap_type": swap_kind}


def value_kinds() -> dict[str, Callable[[Any, int], Any]]:
    kinds = {**TENSOR_KINDS, **SCALAR_KINDS}
    try:
        kinds.update(_array_kinds())
        kinds.update(_record_kinds())
    except ImportError:  # pragma: no cover
        pass
    return kinds


KINDS = value_kinds()
KIND_NAMES = sorted(KINDS)


# ---------------------------------------------------------------------------------------------
# applying a mutation


def candidates(message: Any, free: Iterable[str] = ()) -> list[tuple[str, Slot]]:
    """Every (kind, slot) pair that changes something; ``free`` slot names take no value kinds."""
    free = tuple(free)
    pairs = []
    for slot in slots(message):
        is_free = any(slot.name == f or slot.name.startswith(f + "/") or slot.name.endswith("/" + f) for f in free)
        for name in KIND_NAMES:
            if is_free and name in VALUE_KINDS:
                continue
            if _applies(name, slot.value):
                pairs.append((name, slot))
    return pairs


def _applies(name: str, value: Any) -> bool:
    family = name.split(".")[0]
    if family == "tensor":
        return isinstance(value, torch.Tensor)
    if family == "int":
        return _is_int(value)
    if family in ("bool", "float", "str", "bytes", "dict", "seq"):
        return isinstance(value, {"bool": bool, "float": float, "str": str, "bytes": bytes, "dict": dict,
                                  "seq": (list, tuple)}[family])
    if family == "array":
        return _is_array(value)
    if family == "record":
        return _is_record(value) or _is_record_dict(value)
    return True  # value.odd


def mutate(message: Any, mutation: Mutation, free: Iterable[str] = ()) -> tuple[Any, str] | None:
    """``(mutated copy, description)``, or None when the drawn change is a no-op."""
    pairs = candidates(message, free)
    if not pairs:
        return None
    kinds = sorted({name for name, _ in pairs})
    kind = kinds[mutation.kind % len(kinds)]
    where = [slot for name, slot in pairs if name == kind]
    slot = where[mutation.pick % len(where)]
    new = KINDS[kind](slot.value, mutation.arg)
    if new is None or _same(new, slot.value):
        return None
    try:
        return replace_at(message, slot.path, new), f"{kind}@{slot.name}"
    except (TypeError, ValueError):  # a Flower record refuses the value: it cannot travel at all
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return (a.dtype == b.dtype and a.shape == b.shape and a.layout == b.layout and a.device == b.device
                and a.is_contiguous() == b.is_contiguous() and a.requires_grad == b.requires_grad
                and a.device.type != "meta" and bool(torch.equal(a, b)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - records and arrays compare by identity here
        return a is b


def random_mutation(rng: random.Random) -> Mutation:
    return Mutation(rng.randrange(1 << 16), rng.randrange(1 << 16), rng.randrange(1 << 16))


def mutations() -> Any:
    """Hypothesis strategy of :class:`Mutation`."""
    return st.builds(Mutation, st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.integers(0, 1 << 16))


# ---------------------------------------------------------------------------------------------
# digests of party state


def digest(value: Any) -> str:
    """SHA-256 over a nested state (dicts, lists, tensors, bytes, scalars, Flower records)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.layout}{value.device.type}".encode())
        if value.device.type == "meta":
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            return
        t = (value.to_dense() if value.layout != torch.strided else value).detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"N{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
    elif _is_array(value):
        h.update(f"A{value.dtype}{list(value.shape)}{value.stype}".encode() + value.data)
    elif isinstance(value, dict) or _is_record(value) or _is_record_dict(value):
        h.update(f"D{type(value).__name__}{len(value)}".encode())
        for key in sorted(value.keys(), key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"B" + len(value).to_bytes(8, "little") + bytes(value))
    else:
        h.update(f"V{type(value).__name__}:{value!r}".encode())
