"""The secure client (tenant) party: party 1 of the 2PC, owner of tokens, labels and its halves.

Set-up (once): :meth:`SecureClientParty.setup` takes the dealer's public key, agrees a
dealer key (X25519 + HKDF; all of the client's Beaver material is derived from it, see
``secure_keys``), splits the plaintext initial adapter weights into two random halves —
the cloud's half is the AES-CTR expansion of a fresh seed sent in :class:`ClientSetup`,
the client keeps ``w - PRG(seed)`` and drops the plaintext — and, in ``he`` mode,
generates its CKKS keys (the public context goes to the cloud).

Per step: :meth:`begin` embeds the batch and returns the first message; :meth:`handle`
answers each cloud message (None when the step is over on this side). At most one step
is in flight per tenant: both halves change at the end of a training step, and a second
step in flight would read weights of a different version on each side.

Key rotation (``he``, :mod:`~flower_split.protocol.secure_key_rotation`):
:meth:`start_key_rotation`; the old key is kept until :meth:`confirm_key_rotation` sees the
cloud hold the new one. A resumed cloud checks the
tenant with :meth:`prove_resume`. Between messages the client keeps plain tensors/bytes only
(:meth:`state_dict`): under Flower every message can run in a fresh process. Never replay a
step number with other data: its Beaver material would reveal the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flower_split.config import RunConfig
from flower_split.data import Batch
from flower_split.he import ClientKeys, HEParams, decrypt_loss_and_grad, encrypt_labels, envelope_digest
from flower_split.model import Embedder, HeadAdapter, TailAdapter
from flower_split.mpc import DEFAULT_FRAC_BITS, AdditiveShare, PartyState, decode, encode, new_seed
from flower_split.protocol import resume_proof
from flower_split.protocol.dealer_identity import accept_hello
from flower_split.protocol.labels import label_protection
from flower_split.protocol.input_noise import InputNoise, embed, restore_input_noise
from flower_split.protocol.label_dp import LabelNoise, noisy_g, noisy_share, restore_label_noise
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.opened_range import LOGITS_LIMIT, check_opened
from flower_split.protocol.secure_key_rotation import TenantKeyRotation
from flower_split.protocol.secure_keys import (
    check_public_key, dealer_key, new_private_key, prg, prg_many, private_bytes, private_from_bytes, public_bytes,
)
from flower_split.protocol.secure_messages import (
    ClientSetup, DealerHello, SecureMessage, client_step_number, past_dealt_ahead,
)
from flower_split.protocol.secure_rollback import RollbackPoints
from flower_split.protocol.secure_loads import check_cloud_loads
from flower_split.protocol.secure_party import GRAD_SCALE_BITS, Halves, Optim, SecureStepRunner, StepState
from flower_split.protocol.secure_shape import head_select, pack_rows, step_shape
from flower_split.protocol.secure_step_io import export_step, import_step
from flower_split.protocol.secure_weights import check_activation, plaintext_weights
from flower_split.protocol.secure_steps import CLIENT, WEIGHT_NAMES, StepSpec, weight_shapes


@dataclass
class SecureStepResult:
    """What a finished step gave the client (never sent): its loss and, when opened to it, logits."""

    loss: float | None
    logits: torch.Tensor | None


class SecureClientParty(TenantKeyRotation, SecureStepRunner):
    """State machine of one tenant in secure mode (party 1)."""

    role = CLIENT
    party = 1

    def __init__(self, tenant: str, embedder: Embedder, head: HeadAdapter, tail: TailAdapter,
                 config: RunConfig, total_steps: int, he_params: HEParams | None = None,
                 frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        check_activation(head, "head")
        check_activation(tail.adapter, "tail")
        if config.optimizer != "sgd":
            raise ValueError("optimizer: secure mode needs 'sgd' (see protocol.optim)")
        self.tenant = tenant
        self.embedder = embedder.cpu()
        self.label_protection = config.label_protection
        self.protection = label_protection(self.label_protection)  # what it needs and reveals
        self.label_noise = LabelNoise.from_config(config)  # label-DP noise on g (None: off)
        self.input_noise = InputNoise.from_config(config)  # noise on e before it is shared (None: off)
        self.train_head = config.train_head
        self.frac_bits = frac_bits
        self.grad_scale_bits = GRAD_SCALE_BITS
        self.dim, self.head_rank = head.down.in_features, head.down.out_features
        self.tail_rank, self.classes = tail.adapter.down.out_features, tail.classifier.out_features
        self.tail_input = tail.tail_input
        # the tenant's prior offset (flower_split.model.prior): added to the logits only where
        # they are opened to the tenant alone; None: off
        self.prior = None if tail.prior is None else tail.prior.detach().cpu().to(torch.float64).clone()
        if self.prior is not None and self.protection.logits_to_cloud:
            raise ValueError(f"prior_offset: label protection {self.label_protection!r} computes the loss on the "
                             "cloud, which would need the tenant's label frequencies in the clear")
        self.reproducible_init = config.insecure_reproducible_init  # declared in ClientSetup
        self.optim = Optim(config.lr_head, config.lr_tail, config.classifier_lr, config.momentum,
                           config.weight_decay, config.warmup_fraction, total_steps)
        self._init_weights: dict[str, torch.Tensor] | None = plaintext_weights(head, tail)
        self._he_params = he_params or HEParams(frac_bits=frac_bits + self.grad_scale_bits)
        if self.protection.ckks_keys and self._he_params.frac_bits != frac_bits + self.grad_scale_bits:
            raise ValueError(f"he_params.frac_bits must be {frac_bits + self.grad_scale_bits} "
                             "(ring bits + gradient scale bits)")
        self.he_keys: ClientKeys | None = None  # generated at set-up (he), or restored with the state
        self._pending_he_keys: ClientKeys | None = None  # a rotation's new keys, until the cloud holds them
        self._x25519 = new_private_key()
        self._dealer_key: bytes | None = None
        self.dealer_public: bytes | None = None
        self.halves: Halves | None = None
        self._next_step = 0
        self._step: StepState | None = None
        self._rollback = RollbackPoints()  # halves before the last training steps (for reconcile)
        self.finished: dict[int, SecureStepResult] = {}

    # ------------------------------------------------------------------------ set-up
    def prove_resume(self, ephemeral_public: object, nonce: object) -> bytes:
        """Answer a resumed cloud's challenge (:mod:`~flower_split.protocol.resume_proof`)."""
        try:
            return resume_proof.prove(self._x25519, ephemeral_public, nonce, self.tenant)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc

    def setup(self, hello: DealerHello, pinned_dealer: bytes | None, allow_unpinned: bool = False) -> ClientSetup:
        """Verify the dealer's hello (signed for this tenant by ``pinned_dealer``), agree the
        dealer key, split the initial weights; the set-up message for the cloud."""
        if self.halves is not None:
            raise ProtocolError(f"tenant {self.tenant!r}: already set up")
        if not isinstance(hello, DealerHello):
            raise ProtocolError(f"setup needs a DealerHello, got {type(hello).__name__}")
        accept_hello(hello, self.tenant, pinned_dealer, allow_unpinned)
        try:
            dealer_public = check_public_key(hello.dealer_public, "dealer_public")
        except ValueError as exc:  # a bad key in the hello is the cloud's (or dealer's) fault
            raise ProtocolError(str(exc)) from exc
        if self.protection.ckks_keys:
            self.he_keys = ClientKeys.generate(self._he_params)
        own_public = public_bytes(self._x25519)
        self._dealer_key = dealer_key(self._x25519, dealer_public, "client", self.tenant, dealer_public, own_public)
        self.dealer_public = dealer_public
        assert self._init_weights is not None
        shapes = weight_shapes(self.dim, self.head_rank, self.tail_rank, self.classes)
        seed = new_seed()
        cloud_halves = prg_many(seed, [shapes[name] for name in WEIGHT_NAMES])
        weights = {name: encode(self._init_weights[name].to(torch.float64), self.frac_bits) - cloud
                   for name, cloud in zip(WEIGHT_NAMES, cloud_halves)}
        self._init_weights = None  # the plaintext weights exist nowhere from now on
        self.halves = Halves(self.party, weights, self.optim, self.frac_bits, self.grad_scale_bits)
        return ClientSetup(
            tenant=self.tenant, client_public=own_public, dealer_public=dealer_public,
            he_public=self.he_keys.public_bytes() if self.he_keys is not None else b"",
            weights_seed=seed, dims=(self.dim, self.head_rank, self.tail_rank, self.classes),
            label_protection=self.label_protection, train_head=self.train_head, frac_bits=self.frac_bits,
            grad_scale_bits=self.grad_scale_bits, optim=self.optim.as_dict(), tail_input=self.tail_input,
            reproducible_init=self.reproducible_init)

    # ------------------------------------------------------------------------ steps
    def begin(self, batch: Batch, train: bool = True, *, cloud_step: int,
              ahead: tuple[int, int, int, int] | None = None) -> SecureMessage:
        """Start a step on ``batch``; returns the first message for the cloud.

        ``cloud_step``: the lowest step number the cloud accepts next (in every begin
        instruction). A client whose next step is lower was restored from an older state: its
        openings under a used number's Beaver material would give the cloud the difference of
        two inputs, so it is refused here, before anything is opened; nothing changes.
        A cloud far ahead restarted and skipped numbers: the client skips with it
        (:func:`~flower_split.protocol.secure_messages.client_step_number`). ``ahead``: the
        cloud's material dealt ahead, (step, batch, tokens, rows); a step that cannot use it moves
        past its number (:func:`~flower_split.protocol.secure_messages.past_dealt_ahead`).
        """
        if self.halves is None:
            raise ProtocolError(f"tenant {self.tenant!r}: call setup() first")
        if self._step is not None:
            raise ProtocolError(f"tenant {self.tenant!r}: step {self._step.spec.step} is still in flight "
                                "(secure mode runs one step at a time per tenant)")
        ids, mask, who = batch.input_ids.cpu(), batch.attention_mask.cpu().to(torch.int64), f"tenant {self.tenant!r}"
        shape = step_shape(mask)
        step = past_dealt_ahead(client_step_number(self._next_step, cloud_step, who), ahead, bool(train), shape, who)
        spec = StepSpec(self.tenant, step, shape[0], shape[1], self.dim,
                        self.head_rank, self.tail_rank, self.classes, bool(train), self.train_head,
                        self.label_protection, self.frac_bits, self.tail_input == "pooled", shape[2])
        st = StepState(spec, ctx={"input_ids": ids.clone(), "mask": mask.clone(),
                                  "labels": batch.labels.cpu().to(torch.int64).clone()})
        pre_step = self.halves.snapshot()
        message = self._outgoing(st, self._advance(st, self.halves))
        assert message is not None
        self._step = st
        self._next_step = step + 1
        if spec.train:
            self._rollback.push(pre_step)
        return message

    @property
    def counts(self) -> dict[str, int]:
        """This party's update and sharing-load counts, for the cloud's reconcile (public)."""
        assert self.halves is not None
        return self.halves.counts

    def abort_step(self) -> None:
        """Abandon the step in flight (if any), undoing any update it made to the halves."""
        st = self._step
        if st is None:
            return
        assert self.halves is not None
        if st.spec.train:
            self._rollback.undo(self.halves)
        self._step = None

    def reconcile(self, cloud_counts: object) -> None:
        """Before a step: check the cloud's sharing-load count (:func:`~flower_split.protocol.
        secure_loads.check_cloud_loads`), abort any step in flight, roll back a step the cloud
        did not complete (``cloud_counts``: the cloud's ``Halves.counts``)."""
        if self.halves is None:
            raise ProtocolError(f"tenant {self.tenant!r}: call setup() first")
        check_cloud_loads(self.halves.loads, cloud_counts, f"tenant {self.tenant!r}")
        self.abort_step()
        self._rollback.reconcile(self.halves, cloud_counts, f"tenant {self.tenant!r}")

    def load_shared(self, means: dict[str, torch.Tensor], number: int) -> None:
        """A sharing load, the ``number``-th of this party's halves: ``means`` in place of those
        weights (:meth:`Halves.replace`). Refused with a step in flight or out of order (a
        replayed or skipped load); no rollback point survives it (the cloud drops its own)."""
        if self.halves is None:
            raise ProtocolError(f"tenant {self.tenant!r}: call setup() first")
        if self._step is not None:
            raise ProtocolError(f"tenant {self.tenant!r}: step {self._step.spec.step} is in flight; a sharing load "
                                "now would be undone with it, refused")
        if number != self.halves.loads + 1:
            raise ProtocolError(f"tenant {self.tenant!r}: sharing load {number}, expected {self.halves.loads + 1}; "
                                "refused")
        self.halves.replace(means)
        self._rollback.clear()

    def handle(self, message: SecureMessage) -> SecureMessage | None:
        """Answer one cloud message; on :class:`ProtocolError` no state has changed."""
        if not isinstance(message, SecureMessage):
            raise ProtocolError(f"client: unexpected message type {type(message).__name__}")
        if message.tenant != self.tenant:
            raise ProtocolError(f"message for tenant {message.tenant!r} delivered to {self.tenant!r}")
        st = self._step
        if st is None or message.step != st.spec.step:
            raise ProtocolError(f"tenant {self.tenant!r}: no step {message.step} in flight")
        assert self.halves is not None
        reply = self._receive(st, self.halves, message)
        if self._done(st):
            self.finished[st.spec.step] = SecureStepResult(st.ctx.get("loss"), st.ctx.get("logits"))
            self._step = None
        return reply

    def pop_result(self, step: int) -> SecureStepResult:
        return self.finished.pop(step)

    @property
    def steps_in_flight(self) -> list[int]:
        return [] if self._step is None else [self._step.spec.step]

    def _material_key(self, st: StepState) -> bytes:
        assert self._dealer_key is not None
        return self._dealer_key

    def _correction(self, st: StepState, key: str) -> None:
        return None  # the dealer corrects the cloud's c shares; the client's are pads from its seeds

    # --------------------------------------------------------------------- script ops
    def _share(self, data: torch.Tensor) -> AdditiveShare:
        return AdditiveShare(data, self.party, self.frac_bits)

    def _op_share_input(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        e = embed(self.embedder, self.input_noise, st.ctx["input_ids"], st.ctx["mask"]).to(torch.float64)
        x = encode(pack_rows(e, head_select(st.spec, st.ctx["mask"])), self.frac_bits)  # real tokens; held
        st.ctx["head"] = PartyState(self.party, {"x": self._share(x), "A": halves.share("head.A"),
                                                 "B": halves.share("head.B")}, scope="head")
        out: dict[str, Any] = {"input.mask": st.ctx["mask"]}
        if self.protection.ckks_keys and st.spec.train:
            assert self.he_keys is not None
            envelope = encrypt_labels(self.he_keys, st.ctx["labels"], self.classes)
            st.ctx["he_digest"] = envelope_digest(envelope)
            out["input.labels"] = envelope
        return out

    def _op_open_f(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        share = st.ctx["head"].values["y"].data
        self._release_head_output(st)
        return {"open.f": share}

    def _op_receive_h(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        h = torch.zeros((st.spec.batch, st.spec.tokens, self.dim), dtype=torch.int64)  # the cloud holds h
        st.ctx["tail"] = PartyState(self.party, {"x": self._share(h), "A": halves.share("tail.A"),
                                                 "B": halves.share("tail.B")}, scope="tail")

    def _logits(self, st: StepState, cloud_share: torch.Tensor) -> torch.Tensor:
        """The logits from this party's share and the cloud's, with the prior offset (float64)."""
        z = decode(st.ctx["cls"].values["z"].data + cloud_share, self.frac_bits)
        check_opened("open.z", "logits", z, LOGITS_LIMIT, show_size=False)
        return z if self.prior is None else z + self.prior

    def _op_receive_logits(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        st.ctx["logits"] = self._logits(st, got["open.z"]).float()

    def _op_open_z(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        return {"open.z": st.ctx["cls"].values["z"].data}

    def _op_receive_he_result(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        assert self.he_keys is not None
        result = decrypt_loss_and_grad(self.he_keys, got["he.result"], st.ctx["he_digest"])
        if tuple(result.grad_share.shape) != (st.spec.batch, self.classes):
            raise ProtocolError("he.result: gradient share has the wrong shape")
        st.ctx["loss"] = float(result.loss)
        # share of g at frac_bits + grad_scale_bits bits == share of 2^grad_scale_bits g at frac_bits bits
        st.ctx["cls"].values["gz"] = self._share(noisy_share(self.label_noise, result.grad_share,
                                                             self.frac_bits + self.grad_scale_bits))

    def _op_local_loss(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        z = self._logits(st, got["open.z"])
        labels = st.ctx["labels"]
        st.ctx["loss"] = float(F.cross_entropy(z, labels))
        st.ctx["logits"] = z.float()
        g = (torch.softmax(z, dim=-1) - F.one_hot(labels, self.classes).to(torch.float64)) / st.spec.batch
        g = noisy_g(self.label_noise, g, z)
        seed = new_seed()
        scaled = encode(g * (1 << self.grad_scale_bits), self.frac_bits)
        st.ctx["cls"].values["gz"] = self._share(scaled - prg(seed, tuple(g.shape)))
        return {"loss.seed_g": seed}

    def _op_open_grad_h(self, st: StepState, halves: Halves, got: dict[str, Any]) -> dict[str, Any]:
        share = self._grad_h_share(st)
        self._release(st, "tail", "cls")
        return {"open.grad_h": share}

    def _op_receive_grad_f(self, st: StepState, halves: Halves, got: dict[str, Any]) -> None:
        share = torch.zeros((1, st.spec.head_rows, self.dim), dtype=torch.int64)  # the cloud holds dL/df
        st.ctx["head"].values["gy"] = self._share(share)

    # ------------------------------------------------------------------------ state
    def export_halves(self) -> dict[str, torch.Tensor]:
        """This party's halves (int64 ring); useless alone, the sum with the cloud's is the model."""
        assert self.halves is not None
        return {k: v.clone() for k, v in self.halves.weights.items()}

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """Everything needed to resume this party in another process (tensors, bytes, scalars).

        Contains the client's secrets (its halves, the dealer key, the CKKS secret keys): store it
        with the client's own state, never where the cloud can read. ``copy=False``: live tensors.
        """
        return {
            "tenant": self.tenant, "label_protection": self.label_protection, "train_head": self.train_head,
            "frac_bits": self.frac_bits, "grad_scale_bits": self.grad_scale_bits,
            "dims": [self.dim, self.head_rank, self.tail_rank, self.classes],
            "x25519": private_bytes(self._x25519), "dealer_key": self._dealer_key,
            "dealer_public": self.dealer_public,
            "he_keys": self.he_keys.to_bytes() if self.he_keys is not None else None,
            "he_pending_keys": self._pending_he_keys.to_bytes() if self._pending_he_keys is not None else None,
            "halves": self.halves.state_dict(copy) if self.halves is not None else None,
            "next_step": self._next_step,
            "step": export_step(self._step, copy) if self._step is not None else None,
            "rollback": self._rollback.export(),
            "label_dp": self.label_noise.state_dict() if self.label_noise is not None else None,
            "input_noise": self.input_noise.state_dict() if self.input_noise is not None else None,
            "prior": self.prior.clone() if copy and self.prior is not None else self.prior,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ValueError (naming the entry) if it belongs to another set-up."""
        for name, mine in (("tenant", self.tenant), ("label_protection", self.label_protection),
                           ("train_head", self.train_head), ("frac_bits", self.frac_bits),
                           ("grad_scale_bits", self.grad_scale_bits),
                           ("dims", [self.dim, self.head_rank, self.tail_rank, self.classes])):
            if state.get(name) != mine:
                raise ValueError(f"state: {name} is {state.get(name)!r}, this party has {mine!r}")
        prior = state.get("prior")  # absent in a state saved before the offset existed: off
        if (prior is None) != (self.prior is None):
            raise ValueError(f"state: prior_offset is {prior is not None}, this party's is {self.prior is not None}")
        if prior is not None:
            if (not isinstance(prior, torch.Tensor) or tuple(prior.shape) != (self.classes,)
                    or not prior.is_floating_point() or not bool(torch.isfinite(prior).all())):
                raise ValueError(f"state: prior must be a finite float tensor of shape ({self.classes},)")
            self.prior = prior.to(torch.float64).clone()
        self.input_noise = restore_input_noise(self.input_noise, state.get("input_noise"))
        self._x25519 = private_from_bytes(state["x25519"])
        self._dealer_key = state["dealer_key"]
        self.dealer_public = state["dealer_public"]
        self.he_keys = ClientKeys.from_bytes(state["he_keys"]) if state["he_keys"] is not None else None
        pending = state.get("he_pending_keys")
        self._pending_he_keys = ClientKeys.from_bytes(pending) if pending is not None else None
        self.halves = Halves.from_state(self.party, state["halves"]) if state["halves"] is not None else None
        self._init_weights = None if self.halves is not None else self._init_weights
        self._next_step = int(state["next_step"])
        self._step = import_step(state["step"]) if state["step"] is not None else None
        self._rollback = RollbackPoints.load(state)
        restore_label_noise(self.label_noise, state.get("label_dp"))
