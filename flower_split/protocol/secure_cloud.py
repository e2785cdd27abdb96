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

Step flow (``flower_split.transport.secure_inprocess``): a step's first message goes to
:meth:`SecureCloudParty.material_request` (validated, labels under the tenant's current CKKS
key; gives the dealer request), the dealer's bundle to :meth:`accept_material`, then every
message to :meth:`handle`. Key rotation (``he``): :meth:`accept_key_rotation` replaces a
tenant's public CKKS context between steps; the client switches on :meth:`he_key_id`.
"""

from __future__ import annotations

from typing import Any

import torch

from flower_split.he import batch_bounds, compute_loss_and_grad
from flower_split.model import Body, hidden_size, masked_mean_backward
from flower_split.mpc import DEFAULT_FRAC_BITS, AdditiveShare, PartyState, decode, encode
from flower_split.protocol.body_runner import BodyRunner
from flower_split.protocol.material_seal import open_sealed, seal_key
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.opened_range import GRADIENT_LIMIT, HEAD_OUTPUT_LIMIT, LOGITS_LIMIT, check_opened
from flower_split.protocol.secure_keys import (
    check_public_key, dealer_key, new_private_key, prg, prg_many, private_bytes,
    private_from_bytes, public_bytes,
)
from flower_split.protocol.secure_messages import (
    MAX_STEP, MAX_STEP_TOKENS, STEP_WINDOW, ClientSetup, DealerRegistration, KeyRotation,
    MaterialBundle, MaterialRequest, SecureMessage,
)
from flower_split.protocol.secure_cloud_tenant import CloudTenant
from flower_split.protocol.secure_he_checks import check_key_rotation, check_labels_key
from flower_split.protocol.secure_setup import check_setup
from flower_split.protocol.secure_loads import peer_loads
from flower_split.protocol.secure_party import Halves, SecureStepRunner, StepState
from flower_split.protocol.secure_shape import check_material_size, check_rows, head_select, pack_rows, unpack_rows
from flower_split.protocol.secure_steps import (
    CLOUD, WEIGHT_NAMES, StepSpec, material_keys, programs, weight_shapes,
)

MAX_TOKENS = 4096
MAX_BATCH = 4096


class SecureCloudParty(SecureStepRunner):
    """State machine of the cloud in secure mode (party 0), for any number of tenants."""

    role = CLOUD
    party = 0

    def __init__(self, body: Body, dealer_public: bytes | None, device: torch.device | str = "cpu",
                 frac_bits: int = DEFAULT_FRAC_BITS, keep_graphs: bool = False,
                 allow_reproducible_init: bool = False) -> None:
        """``keep_graphs``: keep each in-flight step's body graph from the forward to the
        gradient (one body forward less per step) instead of keeping only ``f`` and running
        the forward again when ``dL/dh`` arrives. A MiniLM graph of a 32-row step holds about
        200 MB, and every tenant has a step in flight, so the default recomputes.
        ``allow_reproducible_init``: accept tenants whose set-up declares seed-derived initial
        weights (benchmarks only; such a head is no secret to the cloud). Off: refused.
        ``dealer_public``: the dealer's X25519 session key, or None when the dealer is a node
        the cloud meets later (:meth:`bind_dealer` before the first set-up)."""
        self.allow_reproducible_init = allow_reproducible_init
        self.runner = BodyRunner(body, device, keep_graphs)
        self.body, self.device, self.keep_graphs = self.runner.body, self.runner.device, keep_graphs
        self.dim = hidden_size(body.encoder)
        self.dealer_public: bytes | None = None
        if dealer_public is not None:
            self.bind_dealer(dealer_public)
        self.frac_bits = frac_bits
        self._x25519 = new_private_key()
        self.public = public_bytes(self._x25519)
        self.tenants: dict[str, CloudTenant] = {}

    # ------------------------------------------------------------------------ set-up
    def bind_dealer(self, dealer_public: bytes) -> None:
        """Fix the dealer's session key (once; tenants already set up agreed keys with it)."""
        try:
            key = check_public_key(dealer_public, "dealer_public")
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        if self.dealer_public is not None and key != self.dealer_public:
            raise ProtocolError("cloud: already bound to another dealer session key")
        self.dealer_public = key

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
        if self.dealer_public is None:
            raise ProtocolError("setup: the cloud has no dealer yet")
        if setup.dealer_public != self.dealer_public:
            raise ProtocolError("setup: the client agreed a key with another dealer")
        dims, optim, he_keys = check_setup(setup, dim=self.dim, frac_bits=self.frac_bits,
                                           allow_reproducible_init=self.allow_reproducible_init)
        shapes = weight_shapes(*dims)
        halves = Halves(self.party, dict(zip(WEIGHT_NAMES, prg_many(setup.weights_seed,
                                                                   [shapes[n] for n in WEIGHT_NAMES]))),
                        optim, self.frac_bits, setup.grad_scale_bits)
        key = dealer_key(self._x25519, self.dealer_public, "cloud", setup.tenant, self.dealer_public, self.public)
        self.tenants[setup.tenant] = CloudTenant(setup, halves, he_keys, key)
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
    def _tenant(self, tenant: object) -> CloudTenant:
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
        spec = self._spec(record, message.tenant, message.step, message.batch, message.tokens, message.train,
                          message.rows)
        if record.he_keys is not None and spec.train:
            try:
                check_labels_key(record.he_keys, spec, message.items)
            except ValueError as exc:
                raise ProtocolError(f"tenant {message.tenant!r}: {exc}") from exc
        return spec

    def _spec(self, record: CloudTenant, tenant: str, step: int, batch: object, tokens: object,
              train: object, rows: object) -> StepSpec:
        """A step's spec from its (checked) public shape: every size bounded before any work."""
        for name, value, high in (("batch", batch, MAX_BATCH), ("tokens", tokens, MAX_TOKENS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
                raise ProtocolError(f"tenant {tenant!r}: {name} {value!r} out of range 1..{high}")
        assert isinstance(batch, int) and isinstance(tokens, int)
        if batch * tokens > MAX_STEP_TOKENS:
            raise ProtocolError(f"tenant {tenant!r}: batch x tokens = {batch * tokens} is over {MAX_STEP_TOKENS}")
        if not isinstance(train, bool):
            raise ProtocolError("train must be a bool")
        rows = check_rows(batch, tokens, rows, f"tenant {tenant!r}")
        setup = record.setup
        dim, head_rank, tail_rank, classes = setup.dims
        spec = StepSpec(tenant, step, batch, tokens, dim, head_rank, tail_rank, classes, train, setup.train_head,
                        setup.label_protection, self.frac_bits, setup.tail_input == "pooled", rows)
        if record.he_keys is not None and train:
            try:
                batch_bounds(record.he_keys.params, batch, classes)
            except ValueError as exc:
                raise ProtocolError(f"tenant {tenant!r}: {exc}") from exc
        check_material_size(spec)
        return spec

    def material_request(self, message: SecureMessage) -> MaterialRequest | None:
        """Validate a step's first message and say what to ask the dealer for (None: its
        material was asked ahead, :meth:`prefetch_request`, for exactly this step and shape)."""
        spec = self._new_step_spec(message)
        self._check_incoming(StepState(spec), message)  # every item, before the dealer works for it
        record = self.tenants[spec.tenant]
        ahead, record.prefetched = record.prefetched, None
        if ahead is not None and ahead[0] == spec and ahead[1] is not None:
            record.material = ahead
            return None
        if ahead is not None and ahead[0].step >= spec.step:
            # the dealer served that step number for another shape: it will not deal it again
            record.next_step = max(record.next_step, ahead[0].step + 1)
            raise ProtocolError(f"tenant {spec.tenant!r}: step {spec.step} does not match the shape it announced "
                                f"({ahead[0].batch} x {ahead[0].tokens}, {ahead[0].rows} rows); its number is spent")
        record.material = (spec, None)
        return MaterialRequest(spec.tenant, spec.step, spec.batch, spec.tokens, spec.train, spec.rows)

    def prefetch_request(self, tenant: str, batch: object, tokens: object, rows: object) -> MaterialRequest:
        """Ask the dealer now for ``tenant``'s next training step (number :meth:`next_step`),
        whose shape the tenant announced: its material is ready when the first message comes,
        and the dealer's round trip rides along with the current step's (docs/secure.md §9)."""
        record = self._tenant(tenant)
        spec = self._spec(record, tenant, record.next_step, batch, tokens, True, rows)
        record.prefetched = (spec, None)
        return MaterialRequest(tenant, spec.step, spec.batch, spec.tokens, True, spec.rows)

    def accept_material(self, bundle: MaterialBundle) -> None:
        """Open and store the dealer's sealed corrections for a step asked for (now or ahead)."""
        if not isinstance(bundle, MaterialBundle):
            raise ProtocolError(f"cloud: expected MaterialBundle, got {type(bundle).__name__}")
        if isinstance(bundle.step, bool) or not isinstance(bundle.step, int):
            raise ProtocolError(f"material: step must be an int, got {bundle.step!r}")
        record = self._tenant(bundle.tenant)
        slot = next((name for name in ("material", "prefetched") if getattr(record, name) is not None
                     and getattr(record, name)[0].step == bundle.step and getattr(record, name)[1] is None), None)
        if slot is None:
            raise ProtocolError(f"tenant {bundle.tenant!r}: no material was requested for step {bundle.step}")
        spec = getattr(record, slot)[0]
        keys = material_keys(spec)
        shapes = [programs(spec)[key][1].requests()[i].out_shape for key, i in keys]
        tensors = open_sealed(seal_key(record.key), bundle.tenant, bundle.step, spec.material_label(), bundle.sealed,
                              shapes)
        setattr(record, slot, (spec, {f"{key}:{i}": t for (key, i), t in zip(keys, tensors)}))

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
                record.rollback.push(pre_step)
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

    def skip_steps(self, gap: int) -> None:
        """After a restart from saved state: abort steps in flight, every next step ``gap`` on."""
        for name, record in self.tenants.items():
            self.abort_step(name)
            record.skip(gap)

    def abort_step(self, tenant: str, undo_previous: bool = False) -> bool:
        """Abandon ``tenant``'s step in flight (if any) and keep the tenant (:meth:`CloudTenant.abort`;
        the client follows at its next reconcile). False when ``undo_previous`` found nothing to undo."""
        record = self.tenants.get(tenant)
        return True if record is None else record.abort(undo_previous)

    def counts(self, tenant: str) -> dict[str, int]:
        """The update and sharing-load counts of the cloud's halves of ``tenant`` (public)."""
        return self._tenant(tenant).halves.counts

    def reconcile(self, tenant: str, client_counts: object) -> None:
        """Before a step: abort ``tenant``'s step in flight, match the tenant's sharing loads
        (:meth:`CloudTenant.settle_load`), roll back a step the client did not complete."""
        record, who = self._tenant(tenant), f"cloud (tenant {tenant!r})"
        self.abort_step(tenant)
        record.settle_load(peer_loads(client_counts, who), who)
        record.rollback.reconcile(record.halves, client_counts, who)

    def _material_key(self, st: StepState) -> bytes:
        return self.tenants[st.spec.tenant].key

    def _correction(self, st: StepState, key: str) -> torch.Tensor:
        return st.ctx["material"][key]

    # --------------------------------------------------------------------- script ops
    def _share(self, data: torch.Tensor) -> AdditiveShare:
        return AdditiveShare(data, self.party, self.frac_bits)

    def _op_receive_input(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        spec = st.spec
        head_select(spec, got["input.mask"])  # the header's rows are the mask's real tokens
        x = torch.zeros((1, spec.head_rows, spec.dim), dtype=torch.int64)  # the client holds e
        st.ctx["mask"] = got["input.mask"]
        if "input.labels" in got:
            st.ctx["labels_envelope"] = got["input.labels"]
            pool = self.tenants[spec.tenant].he_material
            if pool is not None:  # the loss's randomness is made while the body runs (he/material.py)
                pool.refill((spec.batch, spec.classes))
        st.ctx["head"] = PartyState(self.party, {"x": self._share(x), "A": halves.share("head.A"),
                                                 "B": halves.share("head.B")}, scope="head")

    def opened_f(self, st: StepState, got: dict[str, Any]) -> torch.Tensor:
        """The head output ``f`` [batch, tokens, dim] the client's share in ``got`` opens (checked);
        0 at the padding positions the head skipped (the body masks them). Before ``body_forward``
        only: it drops the cloud's share of ``f`` (``_release_head_output``)."""
        f = decode(st.ctx["head"].values["y"].data + got["open.f"], self.frac_bits)
        check_opened("open.f", "head output", f, HEAD_OUTPUT_LIMIT)
        return unpack_rows(f, head_select(st.spec, st.ctx["mask"]))

    def _op_body_forward(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        f = self.opened_f(st, got)
        h, graph = self.runner.forward(f, st.ctx["mask"], graph=st.spec.trains_head and self.keep_graphs)
        if st.spec.trains_head:
            st.ctx["f"] = f.to(torch.float32)
        if graph is not None:
            st.ctx["_graph"] = graph
        share = encode(h.detach().cpu().to(torch.float64), self.frac_bits)  # held: the client's share is 0
        st.ctx["tail"] = PartyState(self.party, {"x": self._share(share), "A": halves.share("tail.A"),
                                                 "B": halves.share("tail.B")}, scope="tail")
        self._release_head_output(st)

    def _op_open_z(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        return {"open.z": st.ctx["cls"].values["z"].data}

    def _op_he_loss(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        record = self.tenants[st.spec.tenant]
        z = decode(st.ctx["cls"].values["z"].data + got["open.z"], self.frac_bits)  # z opened to the cloud
        check_opened("open.z", "logits", z, LOGITS_LIMIT)
        result = compute_loss_and_grad(record.he_keys, st.ctx.pop("labels_envelope"), z, record.he_material)
        st.ctx["cls"].values["gz"] = self._share(result.grad_mask)
        return {"he.result": result.payload}

    def _op_receive_grad_share(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        st.ctx["cls"].values["gz"] = self._share(prg(got["loss.seed_g"], (st.spec.batch, st.spec.classes)))

    def _op_body_backward(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        grad_h = decode(self._grad_h_share(st) + got["open.grad_h"], self.frac_bits)  # dL/dh, opened
        check_opened("open.grad_h", "gradient", grad_h, GRADIENT_LIMIT)
        if st.spec.tail_pooled:  # opened per sequence: the mean pool's backward over the tokens
            grad_h = masked_mean_backward(grad_h, st.ctx["mask"])
        graph = st.ctx.get("_graph")
        if graph is None:  # not kept (the default), or restored from state_dict: recompute
            _, graph = self.runner.forward(st.ctx["f"], st.ctx["mask"], graph=True)
        grad_f = pack_rows(self.runner.backward(graph, grad_h), head_select(st.spec, st.ctx["mask"]))
        share = encode(grad_f.detach().cpu().to(torch.float64), self.frac_bits)  # held, like h
        st.ctx["head"].values["gy"] = self._share(share)
        self._release(st, "_graph", "f", "tail", "cls")

    # ------------------------------------------------------------------------ state
    def export_halves(self, tenant: str) -> dict[str, torch.Tensor]:
        """The cloud's halves of a tenant (int64 ring; uniformly random on their own)."""
        return {k: v.clone() for k, v in self._tenant(tenant).halves.weights.items()}

    def state_dict(self) -> dict[str, Any]:
        """Plain-data export of the cloud (not the body); the autograd graphs are recomputed on demand."""
        return {"x25519": private_bytes(self._x25519), "dealer_public": self.dealer_public,
                "frac_bits": self.frac_bits, "tenants": {name: r.export() for name, r in self.tenants.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dealer_public is None and state["dealer_public"] is not None:
            self.bind_dealer(state["dealer_public"])
        if state["dealer_public"] != self.dealer_public or state["frac_bits"] != self.frac_bits:
            raise ValueError("state: saved for another dealer or another fixed-point format")
        self._x25519 = private_from_bytes(state["x25519"])
        self.public = public_bytes(self._x25519)
        self.tenants = {name: CloudTenant.load(t, self.party) for name, t in state["tenants"].items()}
