"""The dealer as a protocol party: Beaver material for every tenant's secure steps.

Trust: semi-honest, does not collude with the cloud (DESIGN.md section 3). It learns the
public shapes of each step, never data.

Key agreement: the dealer has one X25519 key pair (:meth:`hello`). For each tenant the
cloud forwards a :class:`DealerRegistration` with the client's and the cloud's public
keys; the dealer derives one 32-byte key with each (``secure_keys.dealer_key``). Per step
the cloud sends a :class:`MaterialRequest` (tenant, step, batch shape, train); the dealer
derives both parties' seeds for every mask and product from the two keys (one mask per
value a module's programs multiply, reused by every product it enters: ``mpc.masks``),
computes c = op(view(a_x), view(a_y)) per product, and returns to the cloud only the
corrections ``masked_c = c - c_client + t_cloud``
(``flower_split.mpc.deal_product`` with ``correction_party=0``), sealed to the cloud
(``material_seal``). The client's share of every triple is the expansion of a seed only it
and the dealer can derive, so:

* nothing of the client's material travels at all (no relay through the cloud, no
  per-step bytes on the client's link);
* the cloud's ``masked_c`` gives it ``c_cloud = c - c_client``, a uniformly random share.

A step number is served once per tenant: a second request for a served step (which
would hand out the same triples for other inputs) is refused.

Identity: the dealer holds a long-term Ed25519 key (``identity``; over Flower read from its
node's key file, never from anything the cloud holds) and signs each tenant's hello with
it (``dealer_identity``); tenants pin its public half. The X25519 session key is fresh per
dealer process state.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import torch

from flower_split.mpc import Use, deal_product, mask_share, product_c
from flower_split.protocol.dealer_identity import identity_public, new_identity, signed_hello
from flower_split.protocol.material_seal import seal, seal_key
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_keys import (
    beaver_seed, check_public_key, dealer_key, new_private_key, prg, private_bytes, private_from_bytes, public_bytes,
)
from flower_split.protocol.secure_messages import (
    MAX_DIM, MAX_STEP, MAX_STEP_TOKENS, DealerHello, DealerRegistration, MaterialBundle, MaterialRequest,
)
from flower_split.protocol.secure_steps import (
    CLIENT, CLOUD, PARTY, StepSpec, mask_label, material_keys, programs, scope_uses,
)
from flower_split.protocol.secure_shape import check_material_size, check_rows

MAX_SHAPE = 4096


class SecureDealerParty:
    """The trusted dealer (a third party, neither the cloud nor a client)."""

    def __init__(self, identity: Ed25519PrivateKey | None = None, frac_bits: int = 16) -> None:
        self._identity: Ed25519PrivateKey | None = identity if identity is not None else new_identity()
        self.identity = identity_public(self._identity)  # what tenants pin
        self._x25519 = new_private_key()
        self.public = public_bytes(self._x25519)
        self.frac_bits = frac_bits
        self._tenants: dict[str, dict[str, Any]] = {}

    def hello(self, tenant: str) -> DealerHello:
        """The session key, signed for ``tenant`` with the dealer's long-term key."""
        if not isinstance(tenant, str) or not tenant:
            raise ProtocolError(f"dealer: hello needs a non-empty tenant id, got {tenant!r}")
        if self._identity is None:
            raise ProtocolError("dealer: restored without its signing key; it cannot sign hellos")
        return signed_hello(self._identity, tenant, self.public)

    def register(self, registration: DealerRegistration) -> None:
        """Derive the tenant's two keys. Registering again before any step was served replaces
        them (a registration whose reply was lost, then a fresh set-up, must not lock the
        tenant out); after that a tenant's keys are fixed."""
        if not isinstance(registration, DealerRegistration):
            raise ProtocolError(f"dealer: expected DealerRegistration, got {type(registration).__name__}")
        if not isinstance(registration.tenant, str) or not registration.tenant:
            raise ProtocolError("dealer: tenant must be a non-empty string")
        if not isinstance(registration.train_head, bool) or not isinstance(registration.tail_pooled, bool):
            raise ProtocolError("dealer: train_head and tail_pooled must be bools")
        previous = self._tenants.get(registration.tenant)
        if previous is not None and previous["next_step"] > 0:
            raise ProtocolError(f"dealer: tenant {registration.tenant!r} is already registered and served")
        try:
            client = check_public_key(registration.client_public, "client_public")
            cloud = check_public_key(registration.cloud_public, "cloud_public")
        except ValueError as exc:
            raise ProtocolError(f"dealer: {exc}") from exc
        dims = tuple(registration.dims) if isinstance(registration.dims, (tuple, list)) else ()
        if len(dims) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_DIM
                                     for v in dims):
            raise ProtocolError(f"dealer: invalid dims {registration.dims!r}")
        tenant = registration.tenant
        self._tenants[tenant] = {
            "client_key": dealer_key(self._x25519, client, "client", tenant, self.public, client),
            "cloud_key": dealer_key(self._x25519, cloud, "cloud", tenant, self.public, cloud),
            "dims": dims, "train_head": bool(registration.train_head), "next_step": 0,
            "tail_pooled": bool(registration.tail_pooled),
        }

    def handle(self, request: MaterialRequest) -> MaterialBundle:
        """The cloud's corrections for every Beaver product of one step."""
        if not isinstance(request, MaterialRequest):
            raise ProtocolError(f"dealer: expected MaterialRequest, got {type(request).__name__}")
        record = self._tenants.get(request.tenant) if isinstance(request.tenant, str) else None
        if record is None:
            raise ProtocolError(f"dealer: unknown tenant {request.tenant!r}")
        if isinstance(request.step, bool) or not isinstance(request.step, int) \
                or request.step < record["next_step"]:
            raise ProtocolError(f"dealer: step {request.step!r} of tenant {request.tenant!r} was already served")
        if request.step >= MAX_STEP:
            raise ProtocolError(f"dealer: step {request.step} of tenant {request.tenant!r} is not below 2^62")
        for name in ("batch", "tokens"):
            value = getattr(request, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SHAPE:
                raise ProtocolError(f"dealer: {name} {value!r} out of range")
        if request.batch * request.tokens > MAX_STEP_TOKENS:
            raise ProtocolError(f"dealer: batch x tokens over {MAX_STEP_TOKENS}")
        if not isinstance(request.train, bool):
            raise ProtocolError(f"dealer: train must be a bool, got {request.train!r}")
        rows = check_rows(request.batch, request.tokens, request.rows, "dealer")
        spec = StepSpec(request.tenant, request.step, request.batch, request.tokens, *record["dims"],
                        request.train, record["train_head"], "client", self.frac_bits,
                        record["tail_pooled"], rows)
        check_material_size(spec)  # what one step may cost the dealer, bounded before it works
        corrections = _corrections(spec, record["cloud_key"], record["client_key"])
        record["next_step"] = request.step + 1
        sealed = seal(seal_key(record["cloud_key"]), request.tenant, request.step, spec.material_label(), corrections)
        return MaterialBundle(request.tenant, request.step, sealed)

    def state_dict(self) -> dict[str, Any]:
        """The dealer's session state (its own secrets: keep it on the dealer's machine, 0600).

        Not the long-term signing key, which stays in its key file; only its public half, so
        that a state is loaded under the identity it was made with."""
        return {"x25519": private_bytes(self._x25519), "frac_bits": self.frac_bits, "identity": self.identity,
                "tenants": {k: dict(v) for k, v in self._tenants.items()}}

    def load_state_dict(self, state: dict[str, Any], same_identity: bool = True) -> None:
        """Load a saved state. ``same_identity`` (default): it must have been made under this
        dealer's key; False (a saved run restored for inference): take the state's identity,
        without its signing key (no new hellos can be signed)."""
        if state["identity"] != self.identity:
            if same_identity:
                raise ValueError("dealer state: saved under another dealer identity key")
            self._identity, self.identity = None, state["identity"]
        self._x25519 = private_from_bytes(state["x25519"])
        self.public = public_bytes(self._x25519)
        self.frac_bits = int(state["frac_bits"])
        self._tenants = {k: dict(v) for k, v in state["tenants"].items()}


def _corrections(spec: StepSpec, cloud_key: bytes, client_key: bytes) -> list[torch.Tensor]:
    """The cloud's correction of every product of the step, in ``material_keys`` order.

    Masks first: one per value per module (``scope_uses``), each party's share from its own
    seed (a value one party holds: its mask is the holder's alone); then per product
    c = op(view(a_x), view(a_y)) (held operands: ``mpc.product_c``) and the cloud's masked c.
    """
    def seed(key: bytes, program: str, index: int) -> bytes:
        return beaver_seed(key, spec.tenant, spec.step, program, index, spec.material_label())

    def mask(key: bytes, party: int, module: str, use: Use) -> torch.Tensor:  # a party's share (held: 0 or all)
        return mask_share(use.holder, party, use.shape, lambda: prg(seed(key, mask_label(module, use.name), 0), use.shape))

    masks = {(module, name): (mask(cloud_key, PARTY[CLOUD], module, use), mask(client_key, PARTY[CLIENT], module, use))
             for module, uses in scope_uses(spec).items() for name, use in uses.items()}
    corrections = []
    for program, index in material_keys(spec):
        module, prog = programs(spec)[program]
        product = prog.products()[index]
        c = product_c(product.request, product.x, product.y,
                      {use.name: masks[(module, use.name)] for use in product.uses})
        cloud_material, _ = deal_product(product.request, c, seed(cloud_key, program, index),
                                         seed(client_key, program, index), correction_party=0)
        assert cloud_material.masked_c is not None
        corrections.append(cloud_material.masked_c)
    return corrections
