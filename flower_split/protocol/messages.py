"""Typed protocol messages of the split-plain protocol and their validation on receipt.

Every message names its tenant and training step; the receiver checks tenant, step, shape
and dtype before touching any state, and a message that fails raises :class:`ProtocolError`
(which transports turn into an error reply). Tensors are the payload; :func:`payload_bytes`
is what a transport would put on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ProtocolError(ValueError):
    """A protocol message is malformed, out of order, or for the wrong tenant."""


@dataclass(frozen=True)
class Message:
    """Common envelope: which tenant, which step."""

    tenant: str
    step: int


@dataclass(frozen=True)
class HeadOutput(Message):
    """client -> cloud: head output ``f`` at the batch's real tokens [R, d] (``pack_tokens``:
    row-major, R = the attention mask's ones) and the attention mask [B, T]. Padding cannot
    change the body's output at real tokens, so it does not travel (about 60 % of a Banking77
    batch's positions).

    ``train`` says whether a :class:`BodyGrad` will follow (then the cloud keeps the graph).
    ``pool``: the client's tail pools first (``tail_input = "pooled"``), so the cloud returns the
    masked mean of ``h`` over the real tokens, [B, d], and takes its gradient back, [B, d]: a
    T-times smaller ``h`` and ``dL/dh`` on the wire, and what the cloud already knows (it holds ``h``).
    """

    f: torch.Tensor
    attention_mask: torch.Tensor
    train: bool
    pool: bool = False


@dataclass(frozen=True)
class BodyOutput(Message):
    """cloud -> client: body output ``h`` [B, T, d], or its masked mean [B, d] (``HeadOutput.pool``)."""

    h: torch.Tensor


@dataclass(frozen=True)
class BodyGrad(Message):
    """client -> cloud: ``dL/dh`` [B, T, d] ([B, d] pooled), the one label-dependent value the cloud sees."""

    grad_h: torch.Tensor


@dataclass(frozen=True)
class HeadGrad(Message):
    """cloud -> client: ``dL/df`` at the real tokens [R, d] (as ``HeadOutput.f``) for the head backward."""

    grad_f: torch.Tensor


HEADER_BYTES = 16  # message type, step and lengths, as a compact binary header would carry them


def payload_bytes(message: object) -> int:
    """Bytes a transport would carry for any protocol message (plain or secure, set-up included).

    A fixed header plus every field's content: tensors (elements x element size), byte and
    text strings (their length, so the tenant id counts), and containers of those, recursively.
    """
    return HEADER_BYTES + sum(_value_bytes(value) for value in vars(message).values())


def _value_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _value_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 0


def check_header(message: object, kind: type | tuple[type, ...]) -> None:
    """Raise :class:`ProtocolError` unless ``message`` is a ``kind`` whose tenant is a non-empty
    string and whose step is a non-negative int (checked before either is used as a key)."""
    if not isinstance(message, kind):
        raise ProtocolError(f"unexpected message type {type(message).__name__}")
    tenant, step = getattr(message, "tenant", None), getattr(message, "step", None)
    if not isinstance(tenant, str) or not tenant:
        raise ProtocolError(f"tenant: expected a non-empty string, got {type(tenant).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ProtocolError(f"step: expected an integer >= 0, got {step!r:.40}")


def check_dense(name: str, tensor: object) -> torch.Tensor:
    """``tensor`` if it is a dense tensor with data (not sparse, not on the meta device), else
    :class:`ProtocolError`: the checks and the compute after them need its values."""
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise ProtocolError(f"{name}: expected a dense tensor with data, got layout {tensor.layout} "
                            f"on {tensor.device.type}")
    return tensor


def check_tensor(name: str, tensor: object, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise :class:`ProtocolError` unless ``tensor`` is dense, has exactly ``shape``, one of
    ``dtypes`` and, if floating point, only finite values."""
    check_dense(name, tensor)
    assert isinstance(tensor, torch.Tensor)
    if tuple(tensor.shape) != tuple(shape):
        raise ProtocolError(f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise ProtocolError(f"{name}: expected dtype in {dtypes}, got {tensor.dtype}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ProtocolError(f"{name}: contains NaN or infinity")
