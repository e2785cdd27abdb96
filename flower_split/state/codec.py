"""Nested party state <-> a JSON tree plus a flat dict of tensors (for safetensors).

The parties' ``state_dict()`` are nested dicts and lists of tensors, bytes, strings,
numbers, booleans and None; dict keys may be ints (torch optimizer state) and values may
be tuples (set-up dimensions). JSON holds none of tensors, bytes, int keys or tuples, so
:func:`encode` replaces each by a small tagged object and moves the payload (bytes as a
uint8 tensor) into the tensor dict under a path-derived name; :func:`decode` inverts it
exactly. :func:`digest` hashes a state the same way, so equal digests mean equal states.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

TENSOR, BYTES, TUPLE, ITEMS = "__tensor__", "__bytes__", "__tuple__", "__items__"


class CodecError(ValueError):
    """A state holds a value the format cannot store, or a stored tree is malformed."""


def encode(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors by name) of ``state``; tensors are contiguous CPU copies."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, "s", tensors), tensors


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, (torch.Tensor, bytes, bytearray)):
        name = path
        while name in tensors:  # keys with dots can spell another entry's path: {"a.b": x, "a": {"b": y}}
            name += "~"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous().clone()
            return {TENSOR: name}
        tensors[name] = torch.frombuffer(bytearray(value), dtype=torch.uint8).clone() if value else \
            torch.zeros(0, dtype=torch.uint8)
        return {BYTES: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {ITEMS: [[_key(k, path), _encode(v, f"{path}.{i}", tensors)]
                        for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CodecError(f"state entry {path}: cannot store a {type(value).__name__}")


def _key(key: Any, path: str) -> Any:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise CodecError(f"state entry {path}: cannot store a dict key of type {type(key).__name__}")


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; :class:`CodecError` names a missing tensor or a bad node."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if TENSOR in tree or BYTES in tree:
        name = tree.get(TENSOR, tree.get(BYTES))
        if name not in tensors:
            raise CodecError(f"tensor {name!r} is missing")
        return tensors[name] if TENSOR in tree else tensors[name].numpy().tobytes()
    if TUPLE in tree:
        return tuple(decode(v, tensors) for v in tree[TUPLE])
    if ITEMS in tree:
        try:
            return {k: decode(v, tensors) for k, v in tree[ITEMS]}
        except (TypeError, ValueError) as exc:
            raise CodecError(f"malformed {ITEMS} node ({exc})") from exc
    return {k: decode(v, tensors) for k, v in tree.items()}


def digest(state: Any) -> str:
    """SHA-256 of a state: its tree (JSON, sorted keys) and every tensor's dtype, shape and bytes."""
    tree, tensors = encode(state)
    hasher = hashlib.sha256(json.dumps(tree, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()
