"""The cloud party: owns the frozen body, serves every tenant.

It never sees tokens, labels or losses: it receives head outputs ``f`` and (when the head
trains) body-output gradients ``dL/dh``. The cloud process is long-lived (in Flower it is the
ServerApp), so it keeps the body's autograd graph of each in-flight step until the matching
gradient arrives, keyed by (tenant, step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flower_split.model import Body, hidden_size
from flower_split.protocol.messages import (
    BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError, check_tensor,
)

FLOAT_DTYPES = (torch.float32,)


@dataclass
class _Pending:
    f: torch.Tensor
    h: torch.Tensor


class CloudParty:
    """State machine of the cloud: ``HeadOutput -> BodyOutput``, ``BodyGrad -> HeadGrad``."""

    def __init__(self, body: Body, device: torch.device | str = "cpu", max_pending: int = 1024) -> None:
        self.body = body.to(device)
        self.device = torch.device(device)
        self.dim = hidden_size(body.encoder)
        self.max_pending = max_pending
        self._pending: dict[tuple[str, int], _Pending] = {}

    @property
    def pending_steps(self) -> list[tuple[str, int]]:
        """(tenant, step) of forwards still waiting for their gradient."""
        return sorted(self._pending)

    def handle(self, message: Message) -> Message:
        """Answer one message; on :class:`ProtocolError` no state has changed."""
        if isinstance(message, HeadOutput):
            return self._forward(message)
        if isinstance(message, BodyGrad):
            return self._backward(message)
        raise ProtocolError(f"cloud: unexpected message type {type(message).__name__}")

    def _forward(self, message: HeadOutput) -> BodyOutput:
        key = (message.tenant, message.step)
        if message.f.dim() != 3:
            raise ProtocolError(f"f: expected [batch, tokens, {self.dim}], got shape {tuple(message.f.shape)}")
        batch, tokens, _ = message.f.shape
        check_tensor("f", message.f, (batch, tokens, self.dim), FLOAT_DTYPES)
        check_tensor("attention_mask", message.attention_mask, (batch, tokens), (torch.long, torch.int32))
        if message.train and key in self._pending:
            raise ProtocolError(f"step {message.step} of tenant {message.tenant!r} is already in flight")
        if message.train and len(self._pending) >= self.max_pending:
            raise ProtocolError(f"cloud: {self.max_pending} steps already in flight; send gradients first")
        f = message.f.to(self.device)
        mask = message.attention_mask.to(self.device)
        if message.train:
            f = f.detach().requires_grad_(True)
            h = self.body(f, mask)
            self._pending[key] = _Pending(f, h)
        else:
            with torch.no_grad():
                h = self.body(f, mask)
        return BodyOutput(message.tenant, message.step, h.detach().cpu())

    def _backward(self, message: BodyGrad) -> HeadGrad:
        key = (message.tenant, message.step)
        pending = self._pending.get(key)
        if pending is None:
            raise ProtocolError(
                f"BodyGrad for step {message.step} of tenant {message.tenant!r} has no matching forward"
            )
        check_tensor("grad_h", message.grad_h, tuple(pending.h.shape), FLOAT_DTYPES)
        del self._pending[key]
        (grad_f,) = torch.autograd.grad(pending.h, pending.f, message.grad_h.to(self.device))
        return HeadGrad(message.tenant, message.step, grad_f.detach().cpu())

    def drop_tenant(self, tenant: str) -> None:
        """Forget in-flight steps of a tenant that dropped out (frees their graphs)."""
        for key in [k for k in self._pending if k[0] == tenant]:
            del self._pending[key]
