"""What the secure client and cloud parties share: the step runner, the tenant's halves, state I/O.

A :class:`StepState` is one party's progress in one step: the position in its script,
the number of messages of the step seen so far, received items not yet consumed, and the
step's values (``ctx``: the ``PartyState`` of the head, tail and classifier programs,
the attention mask, ...). It holds only tensors, bytes and plain values, so it can be
exported with ``secure_step_io.export_value`` and restored with ``import_value`` between two
messages (Flower's ``Context.state``), except for ``ctx`` keys starting with ``_``, which
are caches (the cloud's autograd graph) rebuilt when missing.

Receiving a message is a transaction: it is validated against the step's schedule
(tenant, step, seq, sender, stage, public header, frac_bits, every item), then the
script runs as far as it can; if anything fails, every piece of state the run touched is
restored and :class:`ProtocolError` is raised.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flower_split.mpc import AdditiveShare, MaskSource, PartyState, SeededProduct, Use, mask_share
from flower_split.mpc import mean_pool, mean_pool_backward
from flower_split.mpc.triples import TripleRequest
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_messages import SecureMessage, check_items
from flower_split.protocol.optim import lr_factor, sgd_share_update
from flower_split.protocol.secure_keys import beaver_seed, prg
from flower_split.protocol.secure_steps import (
    CLIENT, CLOUD, Begin, Call, Finish, StepSpec, mask_label, op_needs, opening_specs, peer_of, programs, schedule,
    script,
)

GRAD_SCALE_BITS = 8
"""Gradients enter the 2PC backward scaled by 2^8 (see ``protocol.optim``)."""

MODULE_WEIGHTS = {"head": ("head.A", "head.B"), "tail": ("tail.A", "tail.B"), "cls": ("cls.Wc", "cls.bc")}


@dataclass
class StepState:
    """One party's state of one step between messages."""

    spec: StepSpec
    pc: int = 0
    seq: int = 0
    inbox: dict[str, Any] = field(default_factory=dict)
    ctx: dict[str, Any] = field(default_factory=dict)

    def snapshot(self) -> tuple:
        ctx = {k: _copy_party_state(v) if isinstance(v, PartyState) else v for k, v in self.ctx.items()}
        return self.pc, self.seq, dict(self.inbox), ctx

    def restore(self, snap: tuple) -> None:
        self.pc, self.seq, self.inbox, self.ctx = snap[0], snap[1], snap[2], snap[3]


def _copy_party_state(state: PartyState) -> PartyState:
    return PartyState(state.party, dict(state.values), state.pending, state.scope, dict(state.masks))


@dataclass
class Optim:
    """Public optimizer hyperparameters both parties apply to their halves."""

    lr_head: float
    lr_tail: float
    lr_classifier: float
    momentum: float
    weight_decay: float
    warmup_fraction: float
    total_steps: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def lr(self, name: str) -> float:
        """Base learning rate of weight ``name`` (``head.*``, ``tail.*`` or ``cls.*``)."""
        group = name.split(".", 1)[0]
        return {"head": self.lr_head, "tail": self.lr_tail, "cls": self.lr_classifier}[group]

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Optim:
        """The hyperparameters a peer sent, checked (types first: they come off the wire)."""
        expected = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) != expected:
            raise ProtocolError(f"optim: expected the fields {sorted(expected)}")
        for name in expected:
            value, integral = values[name], name == "total_steps"
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) \
                    or not math.isfinite(value):
                raise ProtocolError(f"optim.{name}: expected {'an integer' if integral else 'a number'}, "
                                    f"got {value!r:.40}")
        optim = cls(**{k: values[k] for k in expected})
        if not (optim.lr_head > 0 and optim.lr_tail > 0 and optim.lr_classifier > 0 and 0 <= optim.momentum < 1
                and optim.weight_decay >= 0 and 0 <= optim.warmup_fraction < 1
                and isinstance(optim.total_steps, int) and optim.total_steps > 0):
            raise ProtocolError(f"optim: invalid hyperparameters {values}")
        return optim


class Halves:
    """One party's halves of a tenant's adapter weights and momentum buffers, their update counts,
    and how many sharing loads replaced some of them (``loads``; both parties count alike)."""

    def __init__(self, party: int, weights: dict[str, torch.Tensor], optim: Optim, frac_bits: int,
                 grad_scale_bits: int) -> None:
        self.party = party
        self.weights = dict(weights)
        self.buffers: dict[str, torch.Tensor] = {}
        self.updates = {"head": 0, "tail": 0}
        self.loads = 0
        self.optim = optim
        self.frac_bits = frac_bits
        self.grad_scale_bits = grad_scale_bits

    def share(self, name: str) -> AdditiveShare:
        return AdditiveShare(self.weights[name], self.party, self.frac_bits)

    def snapshot(self) -> tuple:
        return dict(self.weights), dict(self.buffers), dict(self.updates)

    def restore(self, snap: tuple) -> None:
        self.weights, self.buffers, self.updates = dict(snap[0]), dict(snap[1]), dict(snap[2])

    def update(self, group: str, grads: dict[str, AdditiveShare]) -> None:
        """SGD+momentum on this party's halves of ``group`` ("head" or "tail" = tail + classifier)."""
        factor = lr_factor(self.updates[group], self.optim.total_steps, self.optim.warmup_fraction)
        for name, grad in grads.items():
            lr = self.optim.lr(name) * factor
            if grad.frac_bits != self.frac_bits or tuple(grad.shape) != tuple(self.weights[name].shape):
                raise ProtocolError(f"gradient share of {name} does not match its weight")
            self.weights[name], buf = sgd_share_update(
                self.weights[name], self.buffers.get(name), grad.data, self.party, lr, self.optim.momentum,
                self.optim.weight_decay, self.frac_bits, self.grad_scale_bits)
            if buf is not None:
                self.buffers[name] = buf
        self.updates[group] += 1

    @property
    def counts(self) -> dict[str, int]:
        """What the parties compare before a step (public): update counts and sharing loads."""
        return {**self.updates, "loads": self.loads}

    def replace(self, means: dict[str, torch.Tensor]) -> None:
        """A sharing load: ``means`` (this party's halves of the averaged parameters) in place of
        those weights, with a fresh momentum (no garbage of a failed truncation survives in a
        buffer, docs/secure.md); counted in :attr:`loads`."""
        for name, mean in means.items():
            if name not in self.weights or tuple(mean.shape) != tuple(self.weights[name].shape):
                raise ProtocolError(f"sharing load: {name} does not match a weight of the halves")
        for name, mean in means.items():
            self.weights[name] = mean.clone()
            self.buffers.pop(name, None)
        self.loads += 1

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        return {"weights": {k: v.clone() if copy else v for k, v in self.weights.items()},
                "buffers": {k: v.clone() if copy else v for k, v in self.buffers.items()},
                "updates": dict(self.updates), "loads": self.loads, "optim": self.optim.as_dict(),
                "frac_bits": self.frac_bits, "grad_scale_bits": self.grad_scale_bits}

    @classmethod
    def from_state(cls, party: int, state: dict[str, Any]) -> Halves:
        halves = cls(party, state["weights"], Optim(**state["optim"]), state["frac_bits"],
                     state["grad_scale_bits"])
        halves.buffers = dict(state["buffers"])
        halves.updates = dict(state["updates"])
        halves.loads = int(state.get("loads", 0))  # saved before loads were counted: none
        return halves


class SecureStepRunner:
    """The script interpreter both secure parties inherit.

    Subclasses set ``role`` and ``party`` and implement ``_op_<name>`` for their script's
    ``Call`` operations, :meth:`_material_key` and :meth:`_correction`.
    """

    role: str
    party: int

    # --------------------------------------------------------------------- running
    def _advance(self, st: StepState, halves: Halves) -> dict[str, Any]:
        """Run the script until it needs an item not received yet; return the items given."""
        ops = script(st.spec, self.role)
        out: dict[str, Any] = {}
        while st.pc < len(ops):
            op = ops[st.pc]
            needs = op_needs(st.spec, op, self.role)
            if any(name not in st.inbox for name in needs):
                break
            got = {name: st.inbox.pop(name) for name in needs}
            if isinstance(op, Begin):
                module, program = programs(st.spec)[op.program]
                state = st.ctx[module]
                if state.scope != module:
                    raise RuntimeError(f"{self.role}: {module} values are in scope {state.scope!r}")
                first = sum(len(s.products) for s in program.stages[: op.stage])
                sent = program.stages[op.stage].begin(state, StepSource(self, st, op.program, first))
                names = [item.name for item in opening_specs(st.spec, op.program, op.stage, self.role)]
                out.update(zip(names, sent, strict=True))
            elif isinstance(op, Finish):
                module, program = programs(st.spec)[op.program]
                names = [item.name for item in opening_specs(st.spec, op.program, op.stage, peer_of(self.role))]
                program.stages[op.stage].finish(st.ctx[module], [got[name] for name in names])
            else:
                assert isinstance(op, Call)
                given = getattr(self, f"_op_{op.name}")(st, halves, got) or {}
                if set(given) != {item.name for item in op.gives}:
                    raise RuntimeError(f"{self.role} op {op.name} gave {sorted(given)}")
                out.update(given)
            st.pc += 1
        return out

    def _done(self, st: StepState) -> bool:
        return st.pc == len(script(st.spec, self.role))

    def _outgoing(self, st: StepState, items: dict[str, Any]) -> SecureMessage | None:
        if not items:
            if not self._done(st):
                raise RuntimeError(f"{self.role} is blocked with nothing to send (schedule bug)")
            return None
        plan = schedule(st.spec)[st.seq]
        if plan.sender != self.role or set(items) != {item.name for item in plan.items}:
            raise RuntimeError(f"{self.role} produced message {st.seq} that differs from the schedule")
        spec = st.spec
        message = SecureMessage(spec.tenant, spec.step, st.seq, self.role, plan.stage, spec.train,
                                spec.batch, spec.tokens, spec.frac_bits, items, spec.rows)
        st.seq += 1
        return message

    def _check_incoming(self, st: StepState, message: SecureMessage) -> None:
        """Validate ``message`` against the step's schedule; raise ProtocolError, change nothing."""
        spec = st.spec
        where = f"{self.role}: message {message.seq} of step {message.step} (tenant {message.tenant!r})"
        peer = CLOUD if self.role == CLIENT else CLIENT
        plans = schedule(spec)
        _check_header_types(message, where)
        if message.seq != st.seq:
            raise ProtocolError(f"{where}: out of order, expected message {st.seq}")
        if st.seq >= len(plans) or plans[st.seq].sender != peer:
            raise ProtocolError(f"{where}: no message from the {peer} is expected now")
        plan = plans[st.seq]
        if message.sender != peer:
            raise ProtocolError(f"{where}: sender {message.sender!r}, expected {peer!r}")
        if message.stage != plan.stage:
            raise ProtocolError(f"{where}: stage {message.stage!r}, expected {plan.stage!r}")
        if isinstance(message.frac_bits, bool) or message.frac_bits != spec.frac_bits:
            raise ProtocolError(f"{where}: frac_bits {message.frac_bits!r}, expected {spec.frac_bits}")
        header = (message.train, message.batch, message.tokens, message.rows)
        if header != (spec.train, spec.batch, spec.tokens, spec.rows):
            raise ProtocolError(f"{where}: header (train, batch, tokens, rows) = {header} does not match the step "
                                f"{(spec.train, spec.batch, spec.tokens, spec.rows)}")
        check_items(message.items, plan.items, where)

    def _receive(self, st: StepState, halves: Halves, message: SecureMessage) -> SecureMessage | None:
        """Validate, then run as far as possible; all-or-nothing."""
        self._check_incoming(st, message)
        step_snap, halves_snap = st.snapshot(), halves.snapshot()
        try:
            st.inbox.update(message.items)
            st.seq += 1
            return self._outgoing(st, self._advance(st, halves))
        except BaseException as exc:
            st.restore(step_snap)
            halves.restore(halves_snap)
            if isinstance(exc, (ValueError, TypeError, LookupError)) and not isinstance(exc, ProtocolError):
                raise ProtocolError(f"{self.role}: message {message.seq} of step {message.step} rejected: "
                                    f"{exc}") from exc
            raise

    def _material_key(self, st: StepState) -> bytes:
        """The key this party shares with the dealer for the step's tenant (seeds its material)."""
        raise NotImplementedError

    def _correction(self, st: StepState, key: str) -> torch.Tensor | None:
        """The dealer's correction of product ``key`` (``program:index``) for this party, if any."""
        raise NotImplementedError

    # --------------------------------------------------------- ops common to both parties
    def _op_pool(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        tail = st.ctx["tail"].values
        if st.spec.tail_pooled:  # before the tail adapter: it runs on one row per sequence
            tail["x"] = mean_pool(tail["x"], st.ctx["mask"]).unsqueeze(1)
        else:
            self._to_classifier(st, halves, mean_pool(tail["y"], st.ctx["mask"]))

    def _op_to_classifier(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        y = st.ctx["tail"].values["y"]
        self._to_classifier(st, halves, y.reshape(y.shape[0], y.shape[2]))

    def _to_classifier(self, st: StepState, halves: Halves, pooled: AdditiveShare) -> None:
        st.ctx["cls"] = PartyState(self.party, {"p": pooled, "Wc": halves.share("cls.Wc"),
                                                "bc": halves.share("cls.bc")}, scope="cls")

    def _op_pool_backward(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        st.ctx["tail"].values["gy"] = mean_pool_backward(st.ctx["cls"].values["gp"], st.ctx["mask"])

    def _op_unpool_grad(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        st.ctx["tail"].values["gy"] = st.ctx["cls"].values["gp"].unsqueeze(1)

    @staticmethod
    def _release(st: StepState, *keys: str) -> None:
        """Drop step values no later operation reads, so the state saved between messages (and
        shipped with every message in a simulation) stays small: the tail and classifier scopes
        once ``dL/dh`` is opened, the cloud's body graph and ``f`` once ``dL/df`` is computed."""
        for key in keys:
            st.ctx.pop(key, None)

    @staticmethod
    def _release_head_output(st: StepState) -> None:
        """Once ``f`` is opened, the head's output share ``y`` and its ``hB`` are read by no later
        stage (the head's backward reads ``x``, ``u``, ``h``, ``A``, ``B`` and ``dL/df``)."""
        for name in ("y", "hB"):
            st.ctx["head"].values.pop(name, None)

    @staticmethod
    def _grad_h_share(st: StepState) -> torch.Tensor:
        """This party's share of dL/dh as opened: per token, or per sequence with a pooled tail."""
        gx = st.ctx["tail"].values["gx"].data
        return gx.squeeze(1) if st.spec.tail_pooled else gx

    def _op_update_tail(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        tail, cls = st.ctx["tail"].values, st.ctx["cls"].values
        halves.update("tail", {"tail.A": tail["gA"], "tail.B": tail["gB"],
                               "cls.Wc": cls["gWc"], "cls.bc": cls["gbc"]})

    def _op_update_head(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        head = st.ctx["head"].values
        halves.update("head", {"head.A": head["gA"], "head.B": head["gB"]})


class StepSource(MaskSource):
    """One party's correlated material for one stage: masks and c pads from its dealer seeds."""

    def __init__(self, runner: SecureStepRunner, st: StepState, program: str, first: int) -> None:
        self.party, self._runner, self._st, self._program, self._next = runner.party, runner, st, program, first

    def _seed(self, program: str, index: int) -> bytes:
        spec = self._st.spec
        return beaver_seed(self._runner._material_key(self._st), spec.tenant, spec.step, program, index,
                           spec.material_label())

    def mask(self, scope: str, name: str, shape: tuple[int, ...], holder: int | None = None) -> torch.Tensor:
        return mask_share(holder, self.party, shape, lambda: prg(self._seed(mask_label(scope, name), 0), tuple(shape)))

    def product(self, scope: str, request: TripleRequest, x: Use, y: Use | None) -> torch.Tensor:
        index, self._next = self._next, self._next + 1
        correction = self._runner._correction(self._st, f"{self._program}:{index}")
        return SeededProduct(request, self.party, self._seed(self._program, index), correction).expand()


def _check_header_types(message: SecureMessage, where: str) -> None:
    """The header fields have their exact types (``1.0 == 1`` and ``1 == True`` must not pass)."""
    for name, kind in (("tenant", str), ("sender", str), ("stage", str), ("train", bool), ("step", int),
                       ("seq", int), ("batch", int), ("tokens", int), ("frac_bits", int), ("rows", int)):
        value = getattr(message, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"{where}: {name} must be a {kind.__name__}, got {type(value).__name__}")
