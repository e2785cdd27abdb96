"""The secure cloud party: party 0 of every tenant's 2PC, owner of the frozen body.

Per tenant it keeps its halves of the adapters (expanded from the client's weight seed at
set-up, then updated from its gradient shares: the cloud's weights are random to it),
its momentum buffers, the tenant's public CKKS context (``he`` mode) and its dealer key
(X25519 with the dealer; its Beaver seeds are derived from it and the dealer sends only
the correction tensors, :class:`MaterialBundle`).

What it sees in the clear, by design (DESIGN.md section 3): ``f`` (the head output, for
the body), the logits ``z`` in ``he`` mode, and ``dL/dh`` when the head trains (scaled by
2^grad_scale_bits). Never: tokens, labels, the embeddings ``e``, the loss, ``g``, the
client's Beaver material or its weight halves.

Step flow in process (see ``flower_split.transport.secure_inprocess``): the first message of
a step goes to :meth:`SecureCloudParty.material_request` (validated, including that the
labels envelope is under the tenant's current CKKS key; gives the dealer request), the
dealer's bundle to :meth:`accept_material`, then every message to :meth:`handle`.

Key rotation (``he``): :meth:`accept_key_rotation` replaces a tenant's public CKKS context
between steps; :meth:`he_key_id` is what the client needs to see to switch to the new key.
"""

from __future__ import annotations

from typing import Any

import torch

from flower_split.he import CloudKeys, batch_bounds, compute_loss_and_grad
from flower_split.model import Body, hidden_size, masked_mean_backward
from flower_split.mpc import DEFAULT_FRAC_BITS, AdditiveShare, PartyState, SeededMaterial, decode, encode
from flower_split.mpc import new_seed
from flower_split.mpc.triples import TripleRequest
from flower_split.protocol.body_runner import BodyRunner
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_keys import (
    beaver_seed, check_public_key, dealer_key, new_private_key, prg, prg_many, private_bytes,
    private_from_bytes, public_bytes,
)
from flower_split.protocol.secure_messages import (
    MAX_STEP, MAX_STEP_TOKENS, STEP_WINDOW, ClientSetup, DealerRegistration, KeyRotation,
    MaterialBundle, MaterialRequest, SecureMessage,
)
from flower_split.protocol.secure_he_checks import check_key_rotation, check_labels_key
from flower_split.protocol.secure_setup import check_setup
from flower_split.protocol.secure_party import (
    Halves, SecureStepRunner, StepState, export_step, export_value, import_step, import_value,
)
from flower_split.protocol.secure_steps import (
    CLOUD, WEIGHT_NAMES, StepSpec, material_keys, programs, weight_shapes,
)

MAX_TOKENS = 4096
MAX_BATCH = 4096


class _Tenant:
    """The cloud's record of one tenant."""

    def __init__(self, setup: ClientSetup, halves: Halves, he_keys: CloudKeys | None, key: bytes) -> None:
        self.setup = setup
        self.halves = halves
        self.he_keys = he_keys
        self.key = key
        self.next_step = 0
        self.step: StepState | None = None
        self.pre_step: tuple | None = None  # halves before the last training step (for reconcile)
        self.material: tuple[StepSpec, dict[str, torch.Tensor] | None] | None = None


class SecureCloudParty(SecureStepRunner):
    """State machine of the cloud in secure mode (party 0), for any number of tenants."""

    role = CLOUD
    party = 0

    def __init__(self, body: Body, dealer_public: bytes, device: torch.device | str = "cpu",
                 frac_bits: int = DEFAULT_FRAC_BITS, keep_graphs: bool = False,
                 allow_reproducible_init: bool = False) -> None:
        """``keep_graphs``: keep each in-flight step's body graph from the forward to the
        gradient (one body forward less per step) instead of keeping only ``f`` and running
        the forward again when ``dL/dh`` arrives. A MiniLM graph of a 32-row step holds about
        200 MB, and every tenant has a step in flight, so the default recomputes.

        ``allow_reproducible_init``: accept tenants whose set-up declares seed-derived initial
        weights (benchmarks only; such a head is no secret to the cloud). Off: refused."""
        self.allow_reproducible_init = allow_reproducible_init
        self.runner = BodyRunner(body, device, keep_graphs)
        self.body, self.device, self.keep_graphs = self.runner.body, self.runner.device, keep_graphs
        self.dim = hidden_size(body.encoder)
        self.dealer_public = check_public_key(dealer_public, "dealer_public")
        self.frac_bits = frac_bits
        self._x25519 = new_private_key()
        self.public = public_bytes(self._x25519)
        self.tenants: dict[str, _Tenant] = {}

    # ------------------------------------------------------------------------ set-up
    def register(self, setup: ClientSetup) -> DealerRegistration:
        """Accept a tenant's set-up; returns the registration to forward to the dealer."""
        if not isinstance(setup, ClientSetup):
            raise ProtocolError(f"cloud: expected ClientSetup, got {type(setup).__name__}")
        if not isinstance(setup.tenant, str) or not setup.tenant:
            raise ProtocolError("setup: tenant must be a non-empty string")
        if setup.tenant in self.tenants:
            raise ProtocolError(f"setup: tenant {setup.tenant!r} is already registered")
        try:
            check_public_key(setup.client_public, "client_public")
        except ValueError as exc:
            raise ProtocolError(f"setup: {exc}") from exc
        if setup.dealer_public != self.dealer_public:
            raise ProtocolError("setup: the client agreed a key with another dealer")
        dims, optim, he_keys = check_setup(setup, dim=self.dim, frac_bits=self.frac_bits,
                                           allow_reproducible_init=self.allow_reproducible_init)
        shapes = weight_shapes(*dims)
        halves = Halves(self.party, dict(zip(WEIGHT_NAMES, prg_many(setup.weights_seed,
                                                                   [shapes[n] for n in WEIGHT_NAMES]))),
                        optim, self.frac_bits, setup.grad_scale_bits)
        key = dealer_key(self._x25519, self.dealer_public, "cloud", setup.tenant, self.dealer_public, self.public)
        self.tenants[setup.tenant] = _Tenant(setup, halves, he_keys, key)
        return DealerRegistration(setup.tenant, setup.client_public, self.public, dims, setup.train_head,
                                  setup.tail_input == "pooled")

    # ------------------------------------------------------------------------ CKKS keys
    def he_key_id(self, tenant: str) -> bytes | None:
        """Id of the CKKS key the cloud holds for ``tenant`` (None in 'client' label protection)."""
        keys = self._tenant(tenant).he_keys
        return None if keys is None else keys.key_id

    def accept_key_rotation(self, rotation: KeyRotation) -> bytes:
        """Replace a tenant's public CKKS context with a rotated one; returns the new key id.

        Checked first, nothing changes on a ProtocolError: a known ``he`` tenant with no step in
        flight; the rotation starts from the key the cloud holds (a stale or replayed rotation
        does not); public key material only (a secret key is refused); same HE parameters; the
        announced key id is the material's. From now on labels under the old key are refused.
        """
        if not isinstance(rotation, KeyRotation):
            raise ProtocolError(f"cloud: expected KeyRotation, got {type(rotation).__name__}")
        record = self._tenant(rotation.tenant)
        keys = check_key_rotation(rotation, record.he_keys, record.setup.label_protection,
                                  None if record.step is None else record.step.spec.step)
        record.he_keys = keys
        return keys.key_id

    # ------------------------------------------------------------------------ steps
    def _tenant(self, tenant: object) -> _Tenant:
        record = self.tenants.get(tenant) if isinstance(tenant, str) else None
        if record is None:
            raise ProtocolError(f"cloud: unknown tenant {tenant!r}")
        return record

    def _new_step_spec(self, message: SecureMessage) -> StepSpec:
        """Validate the header of a step's first message; the spec it announces."""
        if not isinstance(message, SecureMessage):
            raise ProtocolError(f"cloud: unexpected message type {type(message).__name__}")
        record = self._tenant(message.tenant)
        if record.step is not None:
            raise ProtocolError(f"tenant {message.tenant!r}: step {record.step.spec.step} is still in flight")
        # step numbers only grow (a step abandoned by a dropped tenant leaves a gap); a number
        # is never reused, since the step's Beaver material is derived from it; and a client is
        # ahead only by steps whose first message was lost (STEP_WINDOW), so no message can
        # exhaust the tenant's step numbers (or overflow a seed label)
        high = min(record.next_step + STEP_WINDOW, MAX_STEP)
        if message.seq != 0 or isinstance(message.step, bool) or not isinstance(message.step, int) \
                or not record.next_step <= message.step < high:
            raise ProtocolError(f"tenant {message.tenant!r}: expected the first message of a step >= "
                                f"{record.next_step} and < {high}, got message {message.seq} of step "
                                f"{message.step!r}")
        for name, value, high in (("batch", message.batch, MAX_BATCH), ("tokens", message.tokens, MAX_TOKENS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
                raise ProtocolError(f"tenant {message.tenant!r}: {name} {value!r} out of range 1..{high}")
        if message.batch * message.tokens > MAX_STEP_TOKENS:
            raise ProtocolError(f"tenant {message.tenant!r}: batch x tokens = {message.batch * message.tokens} "
                                f"is over {MAX_STEP_TOKENS}")
        if not isinstance(message.train, bool):
            raise ProtocolError("train must be a bool")
        setup = record.setup
        dim, head_rank, tail_rank, classes = setup.dims
        spec = StepSpec(message.tenant, message.step, message.batch, message.tokens, dim, head_rank, tail_rank,
                        classes, message.train, setup.train_head, setup.label_protection, self.frac_bits,
                        setup.tail_input == "pooled")
        if record.he_keys is not None and spec.train:
            try:
                batch_bounds(record.he_keys.params, spec.batch, classes)
                check_labels_key(record.he_keys, spec, message.items)
            except ValueError as exc:
                raise ProtocolError(f"tenant {message.tenant!r}: {exc}") from exc
        return spec

    def material_request(self, message: SecureMessage) -> MaterialRequest:
        """Validate a step's first message and say what to ask the dealer for."""
        spec = self._new_step_spec(message)
        self._check_incoming(StepState(spec), message)  # every item, before the dealer works for it
        record = self.tenants[spec.tenant]
        record.material = (spec, None)
        return MaterialRequest(spec.tenant, spec.step, spec.batch, spec.tokens, spec.train)

    def accept_material(self, bundle: MaterialBundle) -> None:
        """Store the dealer's corrections for the requested step (validated)."""
        if not isinstance(bundle, MaterialBundle):
            raise ProtocolError(f"cloud: expected MaterialBundle, got {type(bundle).__name__}")
        record = self._tenant(bundle.tenant)
        if record.material is None or record.material[0].step != bundle.step:
            raise ProtocolError(f"tenant {bundle.tenant!r}: no material was requested for step {bundle.step}")
        spec = record.material[0]
        expected = {f"{key}:{i}": programs(spec)[key][1].requests()[i].out_shape for key, i in material_keys(spec)}
        if not isinstance(bundle.corrections, dict) or set(bundle.corrections) != set(expected):
            raise ProtocolError(f"tenant {bundle.tenant!r}: material bundle does not match step {bundle.step}")
        for name, shape in expected.items():
            tensor = bundle.corrections[name]
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tuple(tensor.shape) != shape \
                    or tensor.layout != torch.strided or tensor.device.type == "meta":
                raise ProtocolError(f"material {name}: expected a dense int64 tensor of shape {shape}")
        record.material = (spec, dict(bundle.corrections))

    def handle(self, message: SecureMessage) -> SecureMessage | None:
        """Answer one client message (None when the step ends with it); on ProtocolError nothing changed."""
        if not isinstance(message, SecureMessage):
            raise ProtocolError(f"cloud: unexpected message type {type(message).__name__}")
        record = self._tenant(message.tenant)
        if message.seq == 0 and record.step is None:
            spec = self._new_step_spec(message)
            if record.material is None or record.material[0] != spec or record.material[1] is None:
                raise ProtocolError(f"tenant {message.tenant!r}: no dealer material for step {message.step}")
            st = StepState(spec, ctx={"material": record.material[1]})
            pre_step = record.halves.snapshot()
            reply = self._receive(st, record.halves, message)
            record.step, record.material = st, None
            record.next_step = spec.step + 1
            if spec.train:
                record.pre_step = pre_step
        else:
            st = record.step
            if st is None or message.step != st.spec.step:
                raise ProtocolError(f"tenant {message.tenant!r}: no step {message.step} in flight")
            reply = self._receive(st, record.halves, message)
        if self._done(st):
            record.step = None
        return reply

    def next_step(self, tenant: str) -> int:
        """The lowest step number the cloud accepts next from ``tenant``.

        Sent with every step's begin instruction: the client refuses to start (and so to open
        anything for) a lower step, which only a client restored from an older state would
        try; replaying a number would reuse its Beaver material on other inputs.
        """
        return self._tenant(tenant).next_step

    @property
    def pending_steps(self) -> list[tuple[str, int]]:
        return sorted((t, r.step.spec.step) for t, r in self.tenants.items() if r.step is not None)

    def drop_tenant(self, tenant: str) -> None:
        """Forget a tenant for good (its halves are lost: the model cannot be recovered)."""
        self.tenants.pop(tenant, None)

    def updates(self, tenant: str) -> dict[str, int]:
        """How many head and tail updates the cloud's halves of ``tenant`` have had (public)."""
        return dict(self._tenant(tenant).halves.updates)

    def abort_step(self, tenant: str) -> None:
        """Abandon ``tenant``'s step in flight (if any), undoing any update it made; keep the tenant."""
        record = self.tenants.get(tenant)
        if record is None:
            return
        if record.step is not None and record.step.spec.train and record.pre_step is not None:
            record.halves.restore(record.pre_step)
        record.step, record.material = None, None

    def reconcile(self, tenant: str, client_updates: object) -> None:
        """Before a step: abort ``tenant``'s step in flight, roll back a step the client did not complete."""
        record = self._tenant(tenant)
        self.abort_step(tenant)
        record.halves.reconcile(record.pre_step, client_updates, f"cloud (tenant {tenant!r})")

    def _materials(self, st: StepState, program: str, first: int,
                   requests: list[TripleRequest]) -> list[SeededMaterial]:
        key = self.tenants[st.spec.tenant].key
        return [SeededMaterial(request, 0, beaver_seed(key, st.spec.tenant, st.spec.step, program, first + i),
                               st.ctx["material"][f"{program}:{first + i}"])
                for i, request in enumerate(requests)]

    # --------------------------------------------------------------------- script ops
    def _share(self, data: torch.Tensor) -> AdditiveShare:
        return AdditiveShare(data, self.party, self.frac_bits)

    def _op_receive_input(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        spec = st.spec
        x = prg(got["input.seed_e"], (spec.batch, spec.tokens, spec.dim))
        st.ctx["mask"] = got["input.mask"]
        if "input.labels" in got:
            st.ctx["labels_envelope"] = got["input.labels"]
        st.ctx["head"] = PartyState(self.party, {"x": self._share(x), "A": halves.share("head.A"),
                                                 "B": halves.share("head.B")})

    def _op_body_forward(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        f = decode(st.ctx["head"].values["y"].data + got["open.f"], self.frac_bits)  # f opened to the cloud
        if not bool(torch.isfinite(f).all()) or float(f.abs().max()) > 1e6:
            raise ProtocolError("open.f: the opened head output is out of range")
        h, graph = self.runner.forward(f, st.ctx["mask"], graph=st.spec.trains_head and self.keep_graphs)
        if st.spec.trains_head:
            st.ctx["f"] = f.to(torch.float32)
        if graph is not None:
            st.ctx["_graph"] = graph
        seed = new_seed()
        share = encode(h.detach().cpu().to(torch.float64), self.frac_bits) - prg(seed, tuple(h.shape))
        st.ctx["tail"] = PartyState(self.party, {"x": self._share(share), "A": halves.share("tail.A"),
                                                 "B": halves.share("tail.B")})
        return {"reshare.seed_h": seed}

    def _op_open_z(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        return {"open.z": st.ctx["cls"].values["z"].data}

    def _op_he_loss(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        record = self.tenants[st.spec.tenant]
        z = decode(st.ctx["cls"].values["z"].data + got["open.z"], self.frac_bits)  # z opened to the cloud
        result = compute_loss_and_grad(record.he_keys, st.ctx.pop("labels_envelope"), z)
        st.ctx["cls"].values["gz"] = self._share(result.grad_mask)
        return {"he.result": result.payload}

    def _op_receive_grad_share(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        st.ctx["cls"].values["gz"] = self._share(prg(got["loss.seed_g"], (st.spec.batch, st.spec.classes)))

    def _op_body_backward(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        grad_h = decode(self._grad_h_share(st) + got["open.grad_h"], self.frac_bits)  # dL/dh, opened
        if not bool(torch.isfinite(grad_h).all()) or float(grad_h.abs().max()) > 1e6:
            raise ProtocolError("open.grad_h: the opened gradient is out of range")
        if st.spec.tail_pooled:  # opened per sequence: the mean pool's backward over the tokens
            grad_h = masked_mean_backward(grad_h, st.ctx["mask"])
        graph = st.ctx.get("_graph")
        if graph is None:  # not kept (the default), or restored from state_dict: recompute
            _, graph = self.runner.forward(st.ctx["f"], st.ctx["mask"], graph=True)
        grad_f = self.runner.backward(graph, grad_h)
        seed = new_seed()
        share = encode(grad_f.detach().cpu().to(torch.float64), self.frac_bits) - prg(seed, tuple(grad_f.shape))
        st.ctx["head"].values["gy"] = self._share(share)
        st.ctx.pop("_graph", None)
        st.ctx.pop("f", None)
        return {"reshare.seed_gf": seed}

    # ------------------------------------------------------------------------ state
    def export_halves(self, tenant: str) -> dict[str, torch.Tensor]:
        """The cloud's halves of a tenant (int64 ring; uniformly random on their own)."""
        return {k: v.clone() for k, v in self._tenant(tenant).halves.weights.items()}

    def state_dict(self) -> dict[str, Any]:
        """Plain-data export of the cloud (not the body); the autograd graphs are recomputed on demand."""
        tenants = {}
        for name, r in self.tenants.items():
            tenants[name] = {
                "setup": dict(vars(r.setup)), "halves": r.halves.state_dict(),
                "he_keys": r.he_keys.to_bytes() if r.he_keys is not None else None,
                "key": r.key, "next_step": r.next_step,
                "pre_step": None if r.pre_step is None else
                {"weights": r.pre_step[0], "buffers": r.pre_step[1], "updates": r.pre_step[2]},
                "step": export_step(r.step) if r.step is not None else None,
                "material": None if r.material is None else
                {"spec": dict(vars(r.material[0])), "corrections": export_value(r.material[1])},
            }
        return {"x25519": private_bytes(self._x25519), "dealer_public": self.dealer_public,
                "frac_bits": self.frac_bits, "tenants": tenants}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dealer_public"] != self.dealer_public or state["frac_bits"] != self.frac_bits:
            raise ValueError("state: saved for another dealer or another fixed-point format")
        self._x25519 = private_from_bytes(state["x25519"])
        self.public = public_bytes(self._x25519)
        self.tenants = {}
        for name, t in state["tenants"].items():
            setup = ClientSetup(**t["setup"])
            record = _Tenant(setup, Halves.from_state(self.party, t["halves"]),
                             CloudKeys.from_bytes(t["he_keys"]) if t["he_keys"] is not None else None, t["key"])
            record.next_step = int(t["next_step"])
            pre = t.get("pre_step")
            record.pre_step = None if pre is None else (dict(pre["weights"]), dict(pre["buffers"]),
                                                        dict(pre["updates"]))
            record.step = import_step(t["step"]) if t["step"] is not None else None
            if t["material"] is not None:
                record.material = (StepSpec(**t["material"]["spec"]), import_value(t["material"]["corrections"]))
            self.tenants[name] = record

