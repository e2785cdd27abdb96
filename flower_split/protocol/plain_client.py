"""The client (tenant) party: owns tokens, labels, the embeddings and its adapters.

Between messages it keeps only the batch of each in-flight step (token ids, mask, labels),
never an autograd graph: the head forward is recomputed for the head backward, because under
Flower's deployment engine every message is handled by a fresh process.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flower_split.config import RunConfig
from flower_split.data import Batch
from flower_split.model import Embedder, HeadAdapter, TailAdapter
from flower_split.model.adapters import pack_tokens
from flower_split.protocol.messages import (
    BodyGrad, BodyOutput, HeadGrad, HeadOutput, Message, ProtocolError, check_header, check_tensor,
)
from flower_split.protocol.input_noise import InputNoise, embed, restore_input_noise
from flower_split.protocol.label_dp import LabelNoise, restore_label_noise
from flower_split.protocol.optim import make_optimizer, warmup_cosine

_log = logging.getLogger(__name__)
AWAIT_BODY_OUTPUT = "await_body_output"
AWAIT_HEAD_GRAD = "await_head_grad"


class TrainingDiverged(ProtocolError):
    """A training step's loss is not finite: refused before any update, so neither party's
    state changes (under Flower the tenant gets an error reply and is dropped from the round,
    instead of sending non-finite gradients the cloud would refuse)."""


@dataclass
class _Step:
    batch: Batch
    train: bool
    stage: str


@dataclass
class StepResult:
    """What a finished step produced, for the client's own bookkeeping (never sent)."""

    loss: float | None
    logits: torch.Tensor


class ClientParty:
    """State machine of one tenant.

    Training step: :meth:`begin` -> ``HeadOutput``; ``BodyOutput`` -> tail forward, loss,
    tail update -> ``BodyGrad``; ``HeadGrad`` -> head update. With ``train_head=False`` the
    step ends at ``BodyOutput`` and nothing label-dependent reaches the cloud.
    """

    def __init__(self, tenant: str, embedder: Embedder, head: HeadAdapter, tail: TailAdapter,
                 config: RunConfig, total_steps: int, device: torch.device | str = "cpu") -> None:
        self.tenant = tenant
        self.device = torch.device(device)
        self.embedder = embedder.to(self.device)
        self.head = head.to(self.device)
        self.tail = tail.to(self.device)
        self.train_head = config.train_head
        if not self.train_head:
            self.head.requires_grad_(False)
        self.tail_optimizer = make_optimizer(config.optimizer, self.tail, config.lr_tail, config.momentum,
                                             config.weight_decay, {"classifier": config.classifier_lr})
        self.tail_schedule = warmup_cosine(self.tail_optimizer, total_steps, config.warmup_fraction)
        self.head_optimizer = None
        if self.train_head:
            self.head_optimizer = make_optimizer(config.optimizer, self.head, config.lr_head,
                                                 config.momentum, config.weight_decay)
            self.head_schedule = warmup_cosine(self.head_optimizer, total_steps, config.warmup_fraction)
        self.label_noise = LabelNoise.from_config(config)  # None: label-DP off
        self.input_noise = InputNoise.from_config(config)  # None: the head sees e itself
        self._steps: dict[int, _Step] = {}
        self._next_step = 0
        self.finished: dict[int, StepResult] = {}
        # True (a run that keeps the loss on the tenant: no loss reports, or label-DP): no reply may
        # depend on whether the loss is finite. For a crafted h that depends on the label
        # (CE([1e38, -inf], y) is 0 or inf), and a refusal, which the cloud may provoke again and
        # again on the same step, would answer it (two hostile reviews, issue 15). So the step goes on
        # whenever the logits are finite (g is then finite for every label), and with a frozen head
        # a step with non-finite logits ends without an update (NaN loss in its result, a warning in
        # the tenant's own log) instead of a refusal that would tell the cloud about the tail.
        self.skip_diverged = False

    def begin(self, batch: Batch, train: bool = True) -> HeadOutput:
        """Start a step: embed, run the head, and send ``f`` to the cloud."""
        step = self._next_step
        self._next_step += 1
        batch = batch.to(self.device)
        with torch.no_grad():
            f = self._head(batch)
        if train and self.label_noise is not None:  # a use of these labels, whatever becomes of the step:
            self.label_noise.count(batch.indices)   # a count at the tail would say whether it ran
        self._steps[step] = _Step(batch, train, AWAIT_BODY_OUTPUT)
        return HeadOutput(self.tenant, step, f.float().cpu(), batch.attention_mask.cpu(), train and self.train_head,
                          pool=self.pooled)

    def handle(self, message: Message) -> Message | None:
        """Answer one cloud message; on :class:`ProtocolError` no state has changed."""
        check_header(message, (BodyOutput, HeadGrad))
        if message.tenant != self.tenant:
            raise ProtocolError(f"message for tenant {message.tenant!r} delivered to {self.tenant!r}")
        step = self._steps.get(message.step)
        if step is None:
            raise ProtocolError(f"tenant {self.tenant!r}: no step {message.step} in flight")
        if isinstance(message, BodyOutput) and step.stage == AWAIT_BODY_OUTPUT:
            return self._on_body_output(message, step)
        if isinstance(message, HeadGrad) and step.stage == AWAIT_HEAD_GRAD:
            return self._on_head_grad(message, step)
        raise ProtocolError(
            f"tenant {self.tenant!r}, step {message.step}: got {type(message).__name__} while in stage {step.stage}"
        )

    def _on_body_output(self, message: BodyOutput, step: _Step) -> BodyGrad | None:
        batch = step.batch
        rows, tokens = batch.input_ids.shape
        shape = (rows, self.tail.classifier.in_features) if self.pooled else (rows, tokens, self.tail.classifier.in_features)
        check_tensor("h", message.h, shape, (torch.float32,))
        h = message.h.detach().to(self.device)  # the received tensor itself is never given a graph
        if not step.train:
            with torch.no_grad():
                logits = self._tail(h, batch)
            self._finish(message.step, StepResult(None, logits.cpu()))
            return None
        send_grad = self.train_head
        h.requires_grad_(send_grad)
        self.tail.train()
        logits = self._tail(h, batch)
        finite_logits = bool(torch.isfinite(logits).all())
        if self.skip_diverged and not send_grad and not finite_logits:
            _log.warning("tenant %r, step %d: logits not finite; the step ends without an update (lower lr_tail "
                         "if this repeats; a cloud sending garbage h would cause it too)", self.tenant, message.step)
            self._finish(message.step, StepResult(math.nan, logits.detach().cpu()))
            return None
        if self.label_noise is not None:  # g = dL/dz gets its noise before the tail backward uses it
            logits.register_hook(self.label_noise.logits_hook(logits))
        loss = F.cross_entropy(logits, batch.labels)
        # Refuse only what does not depend on the labels where the loss stays on the tenant: with finite
        # logits g = softmax(z) - onehot(y) is finite for every label, though CE(z, y) may not be
        if not (finite_logits if self.skip_diverged else torch.isfinite(loss)):
            raise TrainingDiverged(f"tenant {self.tenant!r}, step {message.step}: training diverged (logits or "
                                   "loss not finite); nothing was updated: lower lr_head / lr_tail")
        self.tail_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.tail_optimizer.step()
        self.tail_schedule.step()
        result = StepResult(float(loss.detach()), logits.detach().cpu())
        if not send_grad:
            self._finish(message.step, result)
            return None
        self.finished[message.step] = result
        step.stage = AWAIT_HEAD_GRAD
        return BodyGrad(self.tenant, message.step, h.grad.detach().float().cpu())

    @property
    def pooled(self) -> bool:
        """Whether the tail pools first, so the cloud sends the pooled ``h`` (``HeadOutput.pool``)."""
        return self.tail.tail_input == "pooled"

    def _head(self, batch: Batch) -> torch.Tensor:
        """``f`` at the batch's real tokens [R, d]: the head runs on those alone (``HeadOutput``)."""
        e = embed(self.embedder, self.input_noise, batch.input_ids, batch.attention_mask)
        return self.head(pack_tokens(e, batch.attention_mask))

    def _tail(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.tail.from_pooled(h) if self.pooled else self.tail(h, batch.attention_mask)

    def _on_head_grad(self, message: HeadGrad, step: _Step) -> None:
        batch = step.batch
        shape = (int(batch.attention_mask.sum()), self.head.up.out_features)
        check_tensor("grad_f", message.grad_f, shape, (torch.float32,))
        assert self.head_optimizer is not None
        self.head.train()
        f = self._head(batch)  # recomputed
        self.head_optimizer.zero_grad(set_to_none=True)
        f.backward(message.grad_f.to(self.device))
        self.head_optimizer.step()
        self.head_schedule.step()
        del self._steps[message.step]

    def _finish(self, step: int, result: StepResult) -> None:
        self.finished[step] = result
        del self._steps[step]

    def pop_result(self, step: int) -> StepResult:
        """Take the loss/logits of a finished step."""
        return self.finished.pop(step)

    @property
    def steps_in_flight(self) -> list[int]:
        """Steps begun and not finished yet."""
        return sorted(self._steps)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this party in another process (copies, on the CPU).

        Adapters, optimizer and schedule state, the step counter and the batches of the steps
        in flight. Finished results (:meth:`pop_result`) are the caller's bookkeeping and are
        not part of the state. Values are tensors, plain Python scalars, strings, lists and
        dicts, so a transport can serialize them without knowing the party.
        """
        state: dict[str, Any] = {
            "tenant": self.tenant,
            "train_head": self.train_head,
            "next_step": self._next_step,
            "head": _cpu_copy(self.head.state_dict()),
            "tail": _cpu_copy(self.tail.state_dict()),
            "tail_optimizer": _cpu_copy(self.tail_optimizer.state_dict()),
            "tail_schedule": self.tail_schedule.state_dict(),
            "steps": {
                step: {"input_ids": s.batch.input_ids.cpu().clone(),
                       "attention_mask": s.batch.attention_mask.cpu().clone(),
                       "labels": s.batch.labels.cpu().clone(),
                       "indices": s.batch.indices.cpu().clone(),
                       "train": s.train, "stage": s.stage}
                for step, s in self._steps.items()
            },
        }
        if self.head_optimizer is not None:
            state["head_optimizer"] = _cpu_copy(self.head_optimizer.state_dict())
            state["head_schedule"] = self.head_schedule.state_dict()
        if self.label_noise is not None:
            state["label_dp"] = self.label_noise.state_dict()
        if self.input_noise is not None:
            state["input_noise"] = self.input_noise.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` exported; the party must be built with the same config.

        Raises :class:`ValueError` (naming the entry) when the state belongs to another tenant,
        another ``train_head`` setting or another adapter shape.
        """
        if state.get("tenant") != self.tenant:
            raise ValueError(f"state: belongs to tenant {state.get('tenant')!r}, not {self.tenant!r}")
        if bool(state.get("train_head")) != self.train_head:
            raise ValueError(f"state: saved with train_head={state.get('train_head')!r}, "
                             f"party has train_head={self.train_head}")
        state = _cpu_copy(state)  # the optimizers keep what they load: never the caller's tensors
        steps: dict[int, _Step] = {}
        for step, entry in state["steps"].items():
            stage = entry["stage"]
            if stage not in (AWAIT_BODY_OUTPUT, AWAIT_HEAD_GRAD):
                raise ValueError(f"state: step {step} has unknown stage {stage!r}")
            batch = Batch(entry["input_ids"], entry["attention_mask"], entry["labels"], entry["indices"])
            steps[int(step)] = _Step(batch.to(self.device), bool(entry["train"]), stage)
        restore_label_noise(self.label_noise, state.get("label_dp"))  # first: these raise before any change
        input_noise = restore_input_noise(self.input_noise, state.get("input_noise"))
        self.head.load_state_dict(state["head"])
        self.tail.load_state_dict(state["tail"])
        self.tail_optimizer.load_state_dict(state["tail_optimizer"])
        self.tail_schedule.load_state_dict(state["tail_schedule"])
        if self.head_optimizer is not None:
            self.head_optimizer.load_state_dict(state["head_optimizer"])
            self.head_schedule.load_state_dict(state["head_schedule"])
        self._next_step = int(state["next_step"])
        self._steps = steps
        self.input_noise = input_noise


def _cpu_copy(value: Any) -> Any:
    """Deep copy of nested dicts/lists with every tensor detached, cloned and moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value
