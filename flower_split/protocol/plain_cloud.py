"""The cloud party: owns the frozen body, serves every tenant.

It never sees tokens, labels or losses: it receives head outputs ``f`` and (when the head
trains) body-output gradients ``dL/dh``. The cloud process is long-lived (in Flower it is the
ServerApp), so it keeps the body's autograd graph of each in-flight step until the matching
gradient arrives, keyed by (tenant, step).

Stacking: :meth:`CloudParty.handle_many` runs the body on all head outputs of a call (every
tenant's micro-batches of a Flower stage) together: they are concatenated along the batch
dimension, each right-padded with zeros to the group's longest token length (attention mask
0 on the padding). Rows are independent in a transformer encoder (attention stays within a
sequence, LayerNorm is per token) and padded keys get zero attention weight, so each
message's slice of the stacked output is its own result, up to float rounding. Groups hold
at most ``max_stack_rows`` rows and pad at most ``max_padding`` of their tokens (shortest
sequences first, so similar lengths share a group): padding is compute wasted, which on a
CPU costs more than the per-forward overhead it saves; on a GPU, where few large launches
win, raise ``max_padding`` (``inf``: one group per ``max_stack_rows`` rows).

Training steps: by default (``keep_graphs=False``) the forward runs without a graph and
the cloud keeps only each step's ``f`` and mask; the gradients of a call are answered by
stacking their inputs again, one forward with a graph and one backward per group. That
costs one more body forward per step and bounds the cloud's memory to the inputs: a kept
MiniLM graph of a 32-row micro-batch holds about 200 MB, and ten tenants with eight
micro-batches in flight each held 18 GB (measured, docs/BENCHMARKS.md). With
``keep_graphs=True`` a training group keeps one shared graph instead; its body-output
gradients are answered with one backward per group and call, the rows of members whose
gradient is not in the call getting a zero gradient (so they are unaffected). The graph is
kept (``retain_graph``) while any member still waits for its gradient and freed when none
does, answered or dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from flower_split.model import Body, hidden_size
from flower_split.model.adapters import masked_mean, masked_mean_backward, pack_tokens, unpack_tokens
from flower_split.protocol.body_runner import BodyGraph, BodyRunner
from flower_split.protocol.messages import (
    BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError, check_dense, check_header, check_tensor,
)

FLOAT_DTYPES = (torch.float32,)


@dataclass
class _Pending:
    """A training step waiting for its gradient: its kept group, rows and own token length,
    or (recomputed) its own head output to run again (``f`` per token); its attention mask
    (``dL/df`` goes back at the real tokens) and whether its ``h`` went out pooled."""

    group: BodyGraph | None
    rows: slice
    tokens: int
    mask: torch.Tensor
    pool: bool = False
    inputs: HeadOutput | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.inputs is not None:
            batch, tokens, dim = self.inputs.f.shape
        else:
            assert self.group is not None
            batch, tokens, dim = self.rows.stop - self.rows.start, self.tokens, int(self.group.h.shape[-1])
        return (batch, dim) if self.pool else (batch, tokens, dim)

    def grad_h(self, grad: torch.Tensor) -> torch.Tensor:
        """The received gradient per token [B, T, d]: a pooled one spread back over the real tokens."""
        return masked_mean_backward(grad, self.mask) if self.pool else grad


class CloudParty:
    """State machine of the cloud: ``HeadOutput -> BodyOutput``, ``BodyGrad -> HeadGrad``.

    ``max_pending`` bounds the training steps in flight (each holds its input, or part of a
    graph with ``keep_graphs``); ``max_stack_rows`` bounds the rows of one stacked body
    forward (a single larger micro-batch runs on its own, never split) and ``max_padding`` the
    fraction of padded tokens it may add; ``keep_graphs`` trades memory for one body forward
    per step (see the module docstring).
    """

    def __init__(self, body: Body, device: torch.device | str = "cpu", max_pending: int = 1024,
                 max_stack_rows: int = 256, max_padding: float = 0.25, keep_graphs: bool = False) -> None:
        if max_pending <= 0 or max_stack_rows <= 0 or max_padding < 0:
            raise ValueError("max_pending and max_stack_rows must be positive, max_padding not negative")
        self.runner = BodyRunner(body, device, keep_graphs)
        self.body, self.device = self.runner.body, self.runner.device
        self.dim = hidden_size(body.encoder)
        # the body's position limit (BERT: 512); a longer batch is refused, not run into an IndexError
        self.max_tokens: int | None = getattr(getattr(body.encoder, "config", None), "max_position_embeddings", None)
        self.max_pending = max_pending
        self.max_stack_rows = max_stack_rows
        self.max_padding = max_padding
        self.keep_graphs = keep_graphs
        self._pending: dict[tuple[str, int], _Pending] = {}

    @property
    def pending_steps(self) -> list[tuple[str, int]]:
        """(tenant, step) of forwards still waiting for their gradient."""
        return sorted(self._pending)

    @property
    def graphs_held(self) -> int:
        """Stacked training graphs still held (freed once each member got its gradient or was dropped)."""
        return len({pending.group for pending in self._pending.values() if pending.group is not None})

    def handle(self, message: Message) -> Message:
        """Answer one message; on :class:`ProtocolError` no state has changed."""
        return self.handle_many([message])[0]

    def handle_many(self, messages: Sequence[Message]) -> list[Message]:
        """Answer the messages of one call in order, running the body once per stacked group.

        The call is all or nothing: it is validated as a whole against the state before it
        (:meth:`check`), and if any message is bad, :class:`ProtocolError` names it and no
        state has changed. Callers that must isolate senders (the Flower strategy) check each
        sender's messages first and pass only the valid ones.
        """
        self.check(messages)
        messages = [_per_token(m) for m in messages]
        replies: dict[int, Message] = {}
        grads = [(i, m) for i, m in enumerate(messages) if isinstance(m, BodyGrad)]
        replies.update(self._backward(grads))  # first: frees graphs before new ones are built
        for train in (True, False):
            heads = [(i, m) for i, m in enumerate(messages) if isinstance(m, HeadOutput) and m.train == train]
            for chunk in self._chunks(heads):
                replies.update(self._forward(chunk, train))
        return [replies[i] for i in range(len(messages))]

    def check(self, messages: Sequence[Message], admitted: Sequence[Message] = ()) -> None:
        """Raise :class:`ProtocolError` naming the first of ``messages`` that cannot be answered
        in one call together with ``admitted`` (messages of the same call, already checked).

        Changes nothing. Within a call a step may start (training HeadOutput) or end (BodyGrad)
        once, and the steps in flight before the call plus those it starts must fit in
        ``max_pending``.
        """
        claimed = {claim for claim in map(_claim, admitted) if claim}
        starting = len(self._pending) + sum(1 for m in admitted if isinstance(m, HeadOutput) and m.train)
        for message in messages:
            try:
                self._check_one(message)
                claim = _claim(message)
                if claim in claimed:
                    raise ProtocolError("the same step twice in one call")
                if claim:
                    claimed.add(claim)
                if isinstance(message, HeadOutput) and message.train:
                    starting += 1
                    if starting > self.max_pending:
                        raise ProtocolError(f"{self.max_pending} steps already in flight; send gradients first")
            except ProtocolError as exc:
                raise ProtocolError(f"cloud: {_describe(message)}: {exc}") from None

    def drop_tenant(self, tenant: str) -> None:
        """Forget in-flight steps of a tenant that dropped out; a stacked graph is freed once
        none of its members is left."""
        for key in [k for k in self._pending if k[0] == tenant]:
            del self._pending[key]

    # -- validation ----------------------------------------------------------------------------

    def _check_one(self, message: Message) -> None:
        """Types, shape, dtype and order of one message against the current state."""
        check_header(message, (HeadOutput, BodyGrad))
        if isinstance(message, HeadOutput):
            mask = check_dense("attention_mask", message.attention_mask)
            if mask.dim() != 2 or not mask.shape[0] or not mask.shape[1]:
                raise ProtocolError(f"attention_mask: expected [batch, tokens] with a row and a token, "
                                    f"got {tuple(mask.shape)}")
            check_tensor("attention_mask", mask, tuple(mask.shape), (torch.long, torch.int32))
            _check_mask(mask)
            # f travels at the real tokens, the body runs on every position: a batch padded wider
            # than its longest sequence would cost the cloud d floats per position sent as one int
            longest, tokens = int(mask.sum(1).max()), int(mask.shape[1])
            if longest != tokens:
                raise ProtocolError(f"attention_mask: {tokens} positions, but the longest sequence has {longest} "
                                    "tokens; pad a batch to its longest sequence only")
            if self.max_tokens is not None and tokens > self.max_tokens:
                raise ProtocolError(f"attention_mask: {tokens} tokens, the body takes at most {self.max_tokens}")
            check_tensor("f", check_dense("f", message.f), (int(mask.sum()), self.dim), FLOAT_DTYPES)
            for flag in ("train", "pool"):
                if not isinstance(getattr(message, flag), bool):
                    raise ProtocolError(f"{flag}: expected a bool, got {type(getattr(message, flag)).__name__}")
            if message.train and (message.tenant, message.step) in self._pending:
                raise ProtocolError("this step is already in flight")
        elif isinstance(message, BodyGrad):
            pending = self._pending.get((message.tenant, message.step))
            if pending is None:
                raise ProtocolError("no matching forward")
            check_tensor("grad_h", message.grad_h, pending.shape, FLOAT_DTYPES)
        else:
            raise ProtocolError("unexpected message type")

    # -- compute -------------------------------------------------------------------------------

    def _chunks(self, heads: list[tuple[int, HeadOutput]]) -> list[list[tuple[int, HeadOutput]]]:
        """Stacking groups, shortest sequences first so that similar lengths share a group."""
        chunks: list[list[tuple[int, HeadOutput]]] = []
        for item in sorted(heads, key=lambda item: item[1].f.shape[1]):
            if not chunks or not self._fits([m for _, m in chunks[-1]] + [item[1]]):
                chunks.append([])
            chunks[-1].append(item)
        return chunks

    def _fits(self, group: list[HeadOutput]) -> bool:
        """Whether ``group`` (its last member the longest) stays within ``max_stack_rows`` rows
        and pads at most ``max_padding`` of its tokens."""
        rows = sum(m.f.shape[0] for m in group)
        tokens = sum(m.f.shape[0] * m.f.shape[1] for m in group)
        return rows <= self.max_stack_rows and rows * group[-1].f.shape[1] <= (1 + self.max_padding) * tokens

    def _stack(self, chunk: list[tuple[int, HeadOutput]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's ``f`` and masks concatenated on the device, right-padded to its longest."""
        width = max(m.f.shape[1] for _, m in chunk)
        f = torch.cat([F.pad(m.f, (0, 0, 0, width - m.f.shape[1])) for _, m in chunk]).to(self.device)
        mask = torch.cat([F.pad(m.attention_mask.long(), (0, width - m.f.shape[1])) for _, m in chunk])
        return f, mask.to(self.device)

    def _forward(self, chunk: list[tuple[int, HeadOutput]], train: bool) -> dict[int, BodyOutput]:
        """One body forward over the stacked chunk; each message gets its own rows and tokens."""
        f, mask = self._stack(chunk)
        h, group = self.runner.forward(f, mask, graph=train and self.keep_graphs)
        replies: dict[int, BodyOutput] = {}
        start = 0
        for index, message in chunk:
            rows = slice(start, start + message.f.shape[0])
            start = rows.stop
            tokens = message.f.shape[1]
            mask = message.attention_mask
            if train:
                inputs = None if self.keep_graphs else message
                self._pending[(message.tenant, message.step)] = _Pending(group, rows, tokens, mask, message.pool, inputs)
            out = _cut(h, rows, tokens)
            replies[index] = BodyOutput(message.tenant, message.step, masked_mean(out, mask) if message.pool else out)
        return replies

    def _backward(self, grads: list[tuple[int, BodyGrad]]) -> dict[int, HeadGrad]:
        """One ``autograd.grad`` per group for all of its members' gradients in this call.

        Recomputed steps are stacked into groups again; each group's forward and backward run
        before the next group's forward, so one group's graph is alive at a time.
        """
        members: dict[BodyGraph, list[tuple[int, BodyGrad, _Pending]]] = {}
        again: list[tuple[int, HeadOutput]] = []
        by_index: dict[int, BodyGrad] = {}
        for index, message in grads:
            pending = self._pending.pop((message.tenant, message.step))
            if pending.inputs is not None:
                again.append((index, pending.inputs))
                by_index[index] = message
            else:
                members.setdefault(pending.group, []).append((index, message, pending))
        replies: dict[int, HeadGrad] = {}
        for group, items in members.items():
            replies.update(self._group_backward(group, items))
        for chunk in self._chunks(again):
            f, mask = self._stack(chunk)
            _, group = self.runner.forward(f, mask, graph=True)
            items, start = [], 0
            for index, inputs in chunk:
                rows = slice(start, start + inputs.f.shape[0])
                start = rows.stop
                pending = _Pending(group, rows, inputs.f.shape[1], inputs.attention_mask, inputs.pool)
                items.append((index, by_index[index], pending))
            replies.update(self._group_backward(group, items))
        return replies

    def _group_backward(self, group: BodyGraph, items: list[tuple[int, BodyGrad, _Pending]]) -> dict[int, HeadGrad]:
        """``dL/df`` of the group's members in ``items``; absent members' rows get zero gradient."""
        grad_h = torch.zeros_like(group.h)
        for _, message, pending in items:
            grad_h[pending.rows, :pending.tokens] = pending.grad_h(message.grad_h).to(self.device)
        others = any(p.group is group for p in self._pending.values())
        grad_f = self.runner.backward(group, grad_h, retain=others)
        return {index: HeadGrad(message.tenant, message.step,
                                pack_tokens(_cut(grad_f, pending.rows, pending.tokens), pending.mask))
                for index, message, pending in items}


def _check_mask(mask: torch.Tensor) -> None:
    """An attention mask holds only 0 and 1, and every sequence at least one token."""
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ProtocolError("attention_mask: must hold only 0 and 1")
    if bool((mask.sum(1) == 0).any()):
        raise ProtocolError("attention_mask: every sequence needs at least one token")


def _describe(message: object) -> str:
    """Names a received message in an error: kind, tenant and step."""
    return (f"{type(message).__name__} (tenant {getattr(message, 'tenant', None)!r}, "
            f"step {getattr(message, 'step', None)})")


def _per_token(message: Message) -> Message:
    """A checked head output with ``f`` back at every position [B, T, d] (zero at the padding),
    as the stacked body runs it; other messages as they are."""
    if isinstance(message, HeadOutput):
        return replace(message, f=unpack_tokens(message.f, message.attention_mask))
    return message


def _claim(message: Message) -> tuple[str, str, int] | None:
    """What a message starts or ends in a call: (kind, tenant, step); None for inference."""
    if isinstance(message, BodyGrad) or (isinstance(message, HeadOutput) and message.train):
        return (type(message).__name__, message.tenant, message.step)
    return None


def _cut(stacked: torch.Tensor, rows: slice, tokens: int) -> torch.Tensor:
    """A message's own rows and tokens of a stacked tensor, as a fresh CPU tensor."""
    return stacked[rows, :tokens].detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
