"""The secure step as two scripts (client, cloud) and the message schedule they imply.

A step is fixed by public parameters (:class:`StepSpec`: batch shape, adapter sizes,
train / train_head, label protection). From them both parties build the same 2PC
programs (:mod:`flower_split.mpc.layers`) and their own *script*: a list of operations

* ``Begin(program, stage)``  - start a Beaver stage; gives this party's openings;
* ``Finish(program, stage)`` - needs the peer's openings of that stage;
* ``Call(name, needs, gives)`` - a local step of the party (``_op_<name>``) that may need
  items from the peer (a seed, an opened share, a CKKS envelope) and may give items.

A party runs its script until an operation needs an item it has not received, then sends
everything it gave since its last message as **one** message. This folds the openings of a
stage together with the next stage's (the peer can finish stage k and begin k + 1 in the
same turn), so a 3-stage adapter costs 1.5 round trips, not 3, and every opening of one
stage travels in one message per direction. :func:`schedule` runs this rule on the two
scripts symbolically: it lists every message of the step (sender, stage label, items with
shapes). Both parties validate received messages against it, docs/secure.md prints it, and
the byte and round counts of the benchmark are read off it.

Step outline (DESIGN.md section 3)::

    client: embed, keep the real tokens' rows of e (the mask's ones, packed: [1, rows, d]);
            send mask, Enc(y) (he)             (e is the client's: its share is e, the cloud's 0)
    both:   head.fwd (3 stages, on the packed rows) -> shares of f
    client: send its share of f                (f opened to the cloud only; padding rows = 0)
    cloud:  h = Body(f)                        (the cloud's: its share is h, the client's 0)
    both:   tail.fwd (3 stages), mean pool (local), cls.fwd (1 stage)  -> shares of z
            (tail_pooled: mean pool first, then tail.fwd on one row per sequence)
    he:     client sends its share of z; cloud: Enc(L), Enc(g - m) -> client; shares (m, g - m)
    client: cloud sends its share of z; client: L, g; sends seed_g (cloud's share of g)
    both:   cls.bwd (1), mean pool backward (local), tail.bwd (3); each updates its tail half
            (tail_pooled: tail.bwd, then mean pool backward)
    if train_head:
    client: send its share of dL/dh            (opened to the cloud)
    cloud:  dL/df through the frozen body, its real tokens' rows (the cloud's, like h)
    both:   head.bwd (3 stages, no input gradient); each updates its head half

A value one party holds in the clear (e, h, dL/df) is masked by that party alone and opened
by it alone; a product with it costs each party one ring matmul instead of two
(``mpc.beaver``, "Held operands").
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from functools import lru_cache

from flower_split.mpc import Program, Quadratic, adapter_backward, adapter_forward
from flower_split.mpc import classifier_backward, classifier_forward
from flower_split.mpc.masks import Use
from flower_split.protocol.labels import label_protection
from flower_split.protocol.secure_messages import BLOB, MASK, RING, SEED, ItemSpec

CLIENT, CLOUD = "client", "cloud"
PARTY = {CLOUD: 0, CLIENT: 1}
"""Each role's party index in the 2PC (the cloud is party 0, the client party 1)."""
ACTIVATION = Quadratic(0.25, 0.5, 0.125)
"""The public activation; equals ``flower_split.model.adapters.QUAD_COEFFS``."""

WEIGHT_NAMES = ("head.A", "head.B", "tail.A", "tail.B", "cls.Wc", "cls.bc")
"""Adapter weights, in the order the cloud's initial halves are expanded from its seed."""


@dataclass(frozen=True)
class StepSpec:
    """Public parameters of one step; both parties derive programs and schedule from it."""

    tenant: str
    step: int
    batch: int
    tokens: int
    dim: int
    head_rank: int
    tail_rank: int
    classes: int
    train: bool
    train_head: bool
    label_protection: str
    frac_bits: int
    tail_pooled: bool = False
    rows: int = 0

    @property
    def trains_head(self) -> bool:
        return self.train and self.train_head

    @property
    def head_rows(self) -> int:
        """Rows of the head's 2PC: the batch's real tokens (``rows``, the attention mask's sum),
        or every position, padding included, when ``rows`` is 0 (a shape the protocol accepts; a
        step in flight across an upgrade is refused and reconciled, not resumed)."""
        return self.rows or self.batch * self.tokens

    def material_label(self) -> bytes:
        """Everything besides tenant and step that shapes this step's Beaver material.

        Bound into every Beaver seed (``secure_keys.beaver_seed``) and into the sealing of the
        dealer's bundle: material dealt for another shape of the same step number comes from
        other seeds, so a cloud that asks the dealer for a shape the tenant did not use learns
        nothing about the tenant's real material (the streams would otherwise overlap).
        """
        flags = int(self.train) | int(self.train_head) << 1 | int(self.tail_pooled) << 2
        return struct.pack(">8IB", self.batch, self.tokens, self.rows, self.dim, self.head_rank, self.tail_rank,
                           self.classes, self.frac_bits, flags)

    def shape_key(self) -> StepSpec:
        """The same spec without tenant and step: what programs and schedules depend on."""
        return dataclasses.replace(self, tenant="", step=0)


def weight_shapes(dim: int, head_rank: int, tail_rank: int, classes: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the shared weights (A: [d, r], B: [r, d], Wc: [d, C], bc: [C])."""
    return {"head.A": (dim, head_rank), "head.B": (head_rank, dim), "tail.A": (dim, tail_rank),
            "tail.B": (tail_rank, dim), "cls.Wc": (dim, classes), "cls.bc": (classes,)}


def programs(spec: StepSpec) -> dict[str, tuple[str, Program]]:
    """program key -> (module whose PartyState it runs on, 2PC program), in execution order."""
    return _programs(spec.shape_key())


@lru_cache(maxsize=256)
def _programs(spec: StepSpec) -> dict[str, tuple[str, Program]]:
    b, t, d, m = spec.batch, spec.tokens, spec.dim, spec.head_rows
    tail_t = 1 if spec.tail_pooled else t  # pooled: one row per sequence, shape [b, 1, d]
    client, cloud = PARTY[CLIENT], PARTY[CLOUD]  # the client holds e, the cloud h and dL/df (in the clear)
    out: dict[str, tuple[str, Program]] = {  # the head on the real tokens only, packed: [1, m, d]
        "head.fwd": ("head", adapter_forward(1, m, d, spec.head_rank, ACTIVATION, x_holder=client)),
        "tail.fwd": ("tail", adapter_forward(b, tail_t, d, spec.tail_rank, ACTIVATION, x_holder=cloud)),
        "cls.fwd": ("cls", classifier_forward(b, d, spec.classes)),
    }
    if spec.train:
        out["cls.bwd"] = ("cls", classifier_backward(b, d, spec.classes, input_grad=True))
        out["tail.bwd"] = ("tail", adapter_backward(b, tail_t, d, spec.tail_rank, ACTIVATION,
                                                    input_grad=spec.train_head, x_holder=cloud))
        if spec.train_head:
            out["head.bwd"] = ("head", adapter_backward(1, m, d, spec.head_rank, ACTIVATION, input_grad=False,
                                                        x_holder=client, gy_holder=cloud))
    return out


def mask_label(scope: str, name: str) -> str:
    """What a mask's seed is derived for (``secure_keys.beaver_seed``'s program): never a program key."""
    return f"mask:{scope}:{name}"


def scope_uses(spec: StepSpec) -> dict[str, dict[str, Use]]:
    """module -> every value its programs mask (one mask per value per step), in first-use order
    (a fresh copy: the cached one stays as computed)."""
    return {module: dict(uses) for module, uses in _scope_uses(spec.shape_key()).items()}


@lru_cache(maxsize=256)
def _scope_uses(spec: StepSpec) -> dict[str, dict[str, Use]]:
    out: dict[str, dict[str, Use]] = {}
    for module, program in programs(spec).values():
        uses = out.setdefault(module, {})
        for name, use in program.uses().items():
            first = uses.setdefault(name, use)
            if (first.shape, first.holder) != (use.shape, use.holder):
                raise ValueError(f"{module}: {name!r} is {first.shape} held by {first.holder} in one program, "
                                 f"{use.shape} held by {use.holder} in another")
    return out


def opened_before(spec: StepSpec, program: str) -> frozenset[str]:
    """Values of ``program``'s module that earlier programs of the step opened (reused, not resent)."""
    module, opened = programs(spec)[program][0], set()
    for key, (other, prog) in programs(spec).items():
        if key == program:
            return frozenset(opened)
        if other == module:
            opened |= set(prog.uses())
    raise KeyError(program)


def material_keys(spec: StepSpec) -> list[tuple[str, int]]:
    """(program, index) of every Beaver product of the step, in dealing order."""
    return [(key, i) for key, (_, program) in programs(spec).items() for i in range(len(program.requests()))]


# --------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Begin:
    program: str
    stage: int


@dataclass(frozen=True)
class Finish:
    program: str
    stage: int


@dataclass(frozen=True)
class Call:
    name: str
    needs: tuple[str, ...] = ()
    gives: tuple[ItemSpec, ...] = ()


ScriptOp = Begin | Finish | Call


def opening_specs(spec: StepSpec, program: str, stage: int, sender: str) -> tuple[ItemSpec, ...]:
    """The items ``sender`` sends for a Beaver stage: x - a for each value first masked in it,
    but the values the peer holds in the clear (``masks.Use.holder``)."""
    return _opening_specs(spec.shape_key(), program, stage, sender)


@lru_cache(maxsize=1024)
def _opening_specs(spec: StepSpec, program: str, stage: int, sender: str) -> tuple[ItemSpec, ...]:
    stages = programs(spec)[program][1].stages
    opened = set(opened_before(spec, program))
    for earlier in stages[:stage]:
        opened |= {use.name for use in earlier.opens(opened)}
    return tuple(ItemSpec(f"{program}/{stages[stage].name}/{use.name}/eps", RING, use.shape)
                 for use in stages[stage].sends(opened, PARTY[sender]))


def peer_of(role: str) -> str:
    return CLOUD if role == CLIENT else CLIENT


def op_gives(spec: StepSpec, op: ScriptOp, role: str) -> tuple[ItemSpec, ...]:
    if isinstance(op, Begin):
        return opening_specs(spec, op.program, op.stage, role)
    if isinstance(op, Call):
        return op.gives
    return ()


def op_needs(spec: StepSpec, op: ScriptOp, role: str) -> tuple[str, ...]:
    if isinstance(op, Finish):
        return tuple(item.name for item in opening_specs(spec, op.program, op.stage, peer_of(role)))
    if isinstance(op, Call):
        return op.needs
    return ()


def op_label(op: ScriptOp) -> str:
    if isinstance(op, Call):
        return op.name
    return f"{op.program}[{op.stage}]"


def _beaver(spec: StepSpec, program: str) -> list[ScriptOp]:
    ops: list[ScriptOp] = []
    for stage in range(len(programs(spec)[program][1].stages)):
        ops += [Begin(program, stage), Finish(program, stage)]
    return ops


def _items(spec: StepSpec) -> dict[str, ItemSpec]:
    b, t, d, c = spec.batch, spec.tokens, spec.dim, spec.classes
    return {
        "input.mask": ItemSpec("input.mask", MASK, (b, t)),
        "input.labels": ItemSpec("input.labels", BLOB),
        "open.f": ItemSpec("open.f", RING, (1, spec.head_rows, d)),
        "open.z": ItemSpec("open.z", RING, (b, c)),
        "he.result": ItemSpec("he.result", BLOB),
        "loss.seed_g": ItemSpec("loss.seed_g", SEED),
        "open.grad_h": ItemSpec("open.grad_h", RING, (b, d) if spec.tail_pooled else (b, t, d)),
    }


def _tail_forward(spec: StepSpec) -> list[ScriptOp]:
    """Tail adapter, mean pool and classifier: pool last (per-token tail) or first (pooled tail)."""
    if spec.tail_pooled:
        return [Call("pool"), *_beaver(spec, "tail.fwd"), Call("to_classifier"), *_beaver(spec, "cls.fwd")]
    return [*_beaver(spec, "tail.fwd"), Call("pool"), *_beaver(spec, "cls.fwd")]


def script(spec: StepSpec, role: str) -> tuple[ScriptOp, ...]:
    """The operations of ``role`` ("client" or "cloud") for the step ``spec``."""
    return _script(spec.shape_key(), role)


@lru_cache(maxsize=256)
def _script(spec: StepSpec, role: str) -> tuple[ScriptOp, ...]:
    it = _items(spec)
    he = label_protection(spec.label_protection).ckks_keys  # labels under CKKS, loss on the cloud
    ops: list[ScriptOp] = []
    if role == CLIENT:
        inputs = [it["input.mask"]] + ([it["input.labels"]] if he and spec.train else [])
        ops.append(Call("share_input", gives=tuple(inputs)))
        ops += _beaver(spec, "head.fwd")
        ops.append(Call("open_f", gives=(it["open.f"],)))
        ops.append(Call("receive_h"))
        ops += _tail_forward(spec)
        if not spec.train:
            ops.append(Call("receive_logits", needs=("open.z",)))
            return tuple(ops)
        if he:
            ops.append(Call("open_z", gives=(it["open.z"],)))
            ops.append(Call("receive_he_result", needs=("he.result",)))
        else:
            ops.append(Call("local_loss", needs=("open.z",), gives=(it["loss.seed_g"],)))
    elif role == CLOUD:
        inputs_needed = ("input.mask",) + (("input.labels",) if he and spec.train else ())
        ops.append(Call("receive_input", needs=inputs_needed))
        ops += _beaver(spec, "head.fwd")
        ops.append(Call("body_forward", needs=("open.f",)))
        ops += _tail_forward(spec)
        if not spec.train:
            ops.append(Call("open_z", gives=(it["open.z"],)))
            return tuple(ops)
        if he:
            ops.append(Call("he_loss", needs=("open.z",), gives=(it["he.result"],)))
        else:
            ops.append(Call("open_z", gives=(it["open.z"],)))
            ops.append(Call("receive_grad_share", needs=("loss.seed_g",)))
    else:
        raise ValueError(f"role must be {CLIENT!r} or {CLOUD!r}, got {role!r}")
    ops += _beaver(spec, "cls.bwd")
    if spec.tail_pooled:  # dL/dh is opened per sequence; the cloud spreads it over the tokens
        ops.append(Call("unpool_grad"))
        ops += _beaver(spec, "tail.bwd")
    else:
        ops.append(Call("pool_backward"))
        ops += _beaver(spec, "tail.bwd")
    ops.append(Call("update_tail"))
    if spec.train_head:
        if role == CLIENT:
            ops.append(Call("open_grad_h", gives=(it["open.grad_h"],)))
            ops.append(Call("receive_grad_f"))
        else:
            ops.append(Call("body_backward", needs=("open.grad_h",)))
        ops += _beaver(spec, "head.bwd")
        ops.append(Call("update_head"))
    return tuple(ops)


@dataclass(frozen=True)
class MessageSpec:
    """One message of a step's schedule."""

    seq: int
    sender: str
    stage: str
    items: tuple[ItemSpec, ...]

    @property
    def receiver(self) -> str:
        return CLOUD if self.sender == CLIENT else CLIENT


def schedule(spec: StepSpec) -> tuple[MessageSpec, ...]:
    """Every message of the step, in order, from running both scripts symbolically.

    Raises:
        RuntimeError: the scripts deadlock or leave items unconsumed (a protocol bug).
    """
    return _schedule(spec.shape_key())


@lru_cache(maxsize=256)
def _schedule(spec: StepSpec) -> tuple[MessageSpec, ...]:
    scripts = {role: script(spec, role) for role in (CLIENT, CLOUD)}
    pcs = {CLIENT: 0, CLOUD: 0}
    received: dict[str, set[str]] = {CLIENT: set(), CLOUD: set()}
    messages: list[MessageSpec] = []
    active = CLIENT
    while True:
        gives: list[ItemSpec] = []
        labels: list[str] = []
        ops = scripts[active]
        while pcs[active] < len(ops):
            op = ops[pcs[active]]
            needs = op_needs(spec, op, active)
            if not set(needs) <= received[active]:
                break
            received[active] -= set(needs)
            given = op_gives(spec, op, active)
            if given and op_label(op) not in labels:
                labels.append(op_label(op))
            gives += given
            pcs[active] += 1
        other = CLOUD if active == CLIENT else CLIENT
        if not gives:
            if pcs[CLIENT] == len(scripts[CLIENT]) and pcs[CLOUD] == len(scripts[CLOUD]):
                break
            raise RuntimeError(f"secure step schedule deadlocks: {active} at op {pcs[active]} has nothing to send")
        names = [item.name for item in gives]
        if len(set(names)) != len(names):
            raise RuntimeError(f"duplicate item names in one message: {names}")
        messages.append(MessageSpec(len(messages), active, "+".join(labels), tuple(gives)))
        received[other] |= set(names)
        active = other
    leftover = received[CLIENT] | received[CLOUD]
    if leftover:
        raise RuntimeError(f"secure step schedule leaves items unconsumed: {sorted(leftover)}")
    return tuple(messages)
