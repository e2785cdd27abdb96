"""Typed messages of the secure protocol and their validation on receipt.

Two families:

* set-up, key and dealer messages, one dataclass each (:class:`DealerHello`,
  :class:`ClientSetup`, :class:`KeyRotation`, :class:`DealerRegistration`,
  :class:`MaterialRequest`, :class:`MaterialBundle`);
* step messages (:class:`SecureMessage`): one per direction per exchange of a training or
  inference step. Which items a step message carries is fixed by the step's public
  parameters (:class:`flower_split.protocol.secure_steps.StepSpec`): the schedule derived
  from both parties' scripts lists, for every message number ``seq``, its sender, its stage
  label and the exact items with their :class:`ItemSpec` (kind, shape). docs/secure.md has
  the table. The receiver checks tenant, step, seq, sender, stage, ``frac_bits``, the
  public step header (batch, tokens, train) and every item (set of names, kind, dtype
  int64 for ring values, shape, byte lengths) before touching any state; any mismatch is a
  :class:`~flower_split.protocol.messages.ProtocolError`.

Item kinds: ``ring`` (int64 tensor in Z_2^64 carrying ``frac_bits`` fractional bits),
``mask`` (int64 0/1 attention mask, public), ``seed`` (32 bytes) and ``blob`` (bytes: a
CKKS envelope, validated again by the HE layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flower_split.mpc import SEED_BYTES
from flower_split.protocol.messages import ProtocolError, check_dense

RING, MASK, SEED, BLOB = "ring", "mask", "seed", "blob"
ITEM_KINDS = (RING, MASK, SEED, BLOB)
MAX_BLOB_BYTES = 64 * 1024 * 1024
MAX_DIM = 1 << 16
"""Largest adapter dimension (width, rank, classes) a set-up may declare."""
MAX_WEIGHTS = 1 << 24
"""Largest number of adapter weights (all halves' elements, 128 MiB of int64) a set-up may declare."""
MAX_STEP_TOKENS = 1 << 16
"""Largest batch x tokens of one step: the dealer's work is sized by a step's header alone."""
MAX_STEP = 1 << 62
"""Step numbers are below 2^62: far from the 64 bits a Beaver seed's label packs them into."""
RESUME_STEP_GAP = 1 << 20
"""Step numbers a cloud restarted from saved state skips: more than any round uses, so beyond
every number the tenant or the dealer used after the cloud's last save."""
RESUME_JUMP_MIN = RESUME_STEP_GAP // 2
"""A client accepts a cloud that far ahead of it as a restarted one (and skips to its number);
a cloud ahead by less means the client's own state is stale, and it refuses."""
STEP_WINDOW = 1024
"""The cloud takes a first message for a step in [expected, expected + STEP_WINDOW): a client
is ahead of the cloud only by steps whose first message was lost, and no message can jump
the tenant's step counter to the end of its space."""


def check_step(step: object, low: int, high: int, what: str) -> int:
    """``step`` if it is an int in [low, min(high, MAX_STEP)), else :class:`ProtocolError` naming ``what``."""
    high = min(high, MAX_STEP)
    if isinstance(step, bool) or not isinstance(step, int) or not low <= step < high:
        raise ProtocolError(f"{what}: step {step!r} is outside [{low}, {high})")
    return step


@dataclass(frozen=True)
class ItemSpec:
    """What one named item of a step message must be."""

    name: str
    kind: str
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ITEM_KINDS:
            raise ValueError(f"item {self.name!r}: unknown kind {self.kind!r}")

    def nbytes(self) -> int:
        """Bytes on the wire (tensors at 8 bytes per element; blobs are counted when sent)."""
        if self.kind in (RING, MASK):
            count = 1
            for size in self.shape:
                count *= size
            return 8 * count
        return SEED_BYTES if self.kind == SEED else 0

    def check(self, value: object) -> None:
        """Raise :class:`ProtocolError` unless ``value`` matches this spec."""
        if self.kind in (RING, MASK):
            if not isinstance(value, torch.Tensor):
                raise ProtocolError(f"item {self.name!r}: expected an int64 tensor, got {type(value).__name__}")
            check_dense(f"item {self.name!r}", value)
            if value.dtype != torch.int64:
                raise ProtocolError(f"item {self.name!r}: expected dtype torch.int64, got {value.dtype}")
            if tuple(value.shape) != self.shape:
                raise ProtocolError(f"item {self.name!r}: expected shape {self.shape}, got {tuple(value.shape)}")
            if self.kind == MASK:
                if bool(((value != 0) & (value != 1)).any()):
                    raise ProtocolError(f"item {self.name!r}: attention mask must hold only 0 and 1")
                if value.numel() and bool((value.sum(1) == 0).any()):
                    raise ProtocolError(f"item {self.name!r}: every sequence needs at least one token")
            return
        if not isinstance(value, bytes):
            raise ProtocolError(f"item {self.name!r}: expected bytes, got {type(value).__name__}")
        if self.kind == SEED and len(value) != SEED_BYTES:
            raise ProtocolError(f"item {self.name!r}: expected a {SEED_BYTES}-byte seed, got {len(value)} bytes")
        if self.kind == BLOB and not 0 < len(value) <= MAX_BLOB_BYTES:
            raise ProtocolError(f"item {self.name!r}: blob of {len(value)} bytes is out of range")


@dataclass(frozen=True)
class SecureMessage:
    """One step message between a client and the cloud (either direction).

    Attributes:
        tenant: the tenant the step belongs to.
        step: the tenant's step number.
        seq: position of this message in the step's schedule (0, 1, ...).
        sender: ``"client"`` or ``"cloud"``.
        stage: the schedule's label for this message (which stages' openings it carries).
        train: whether the step trains (public; fixes the schedule).
        batch, tokens: the batch shape (public; fixes every item shape).
        frac_bits: fractional bits of every ring item.
        items: item name -> tensor or bytes.
        rows: the batch's real tokens, the rows of the head's 2PC (public: the attention mask's
            sum; 0: every position, padding included).
    """

    tenant: str
    step: int
    seq: int
    sender: str
    stage: str
    train: bool
    batch: int
    tokens: int
    frac_bits: int
    items: dict[str, Any] = field(default_factory=dict)
    rows: int = 0


def check_items(items: object, specs: tuple[ItemSpec, ...], where: str) -> None:
    """Raise :class:`ProtocolError` unless ``items`` holds exactly ``specs``, each valid."""
    if not isinstance(items, dict):
        raise ProtocolError(f"{where}: items must be a dict, got {type(items).__name__}")
    expected = {spec.name for spec in specs}
    if set(items) != expected:
        missing, extra = sorted(expected - set(items)), sorted(set(items) - expected)
        raise ProtocolError(f"{where}: items do not match the schedule (missing {missing}, unexpected {extra})")
    for spec in specs:
        spec.check(items[spec.name])


# ----------------------------------------------------------------- set-up and dealer messages
@dataclass(frozen=True)
class DealerHello:
    """dealer -> cloud, and relayed by the cloud -> client: the dealer's X25519 session key.

    ``signature``: the dealer's Ed25519 signature over the session key and ``tenant``
    (:mod:`flower_split.protocol.dealer_identity`); the tenant verifies it under the dealer
    key it pinned. Empty only from a dealer co-located with the cloud (insecure, tests).
    """

    dealer_public: bytes
    tenant: str = ""
    signature: bytes = b""


@dataclass(frozen=True)
class ClientSetup:
    """client -> cloud, once per tenant: everything public the cloud needs, and its weight seed.

    Attributes:
        tenant: tenant id.
        client_public: the client's X25519 public key (the cloud relays it to the dealer).
        dealer_public: the dealer key the client agreed with (must be the dealer's).
        he_public: CKKS public context (``he`` label protection) or empty bytes.
        weights_seed: 32-byte seed; the cloud's initial halves of all adapter weights are
            its AES-CTR expansion, in the order of ``secure_steps.WEIGHT_NAMES``.
        dims: dim, head_rank, tail_rank, classes.
        label_protection, train_head, frac_bits, grad_scale_bits: protocol options.
        optim: public optimizer hyperparameters (lr_head, lr_tail, lr_classifier, momentum,
            weight_decay, warmup_fraction, total_steps): the cloud must update its halves with
            the same rule.
        tail_input: "tokens" (the tail adapter on every token) or "pooled" (on the mean-pooled
            body output): fixes the tail's 2PC shapes and the step's order.
        reproducible_init: the initial weights were drawn from a public seed
            (``insecure-reproducible-init``), not the tenant's CSPRNG: the cloud could compute
            them and track the head. The cloud refuses it unless its run allows it (benchmarks).
    """

    tenant: str
    client_public: bytes
    dealer_public: bytes
    he_public: bytes
    weights_seed: bytes
    dims: tuple[int, int, int, int]
    label_protection: str
    train_head: bool
    frac_bits: int
    grad_scale_bits: int
    optim: dict[str, float]
    tail_input: str = "tokens"
    reproducible_init: bool = False


@dataclass(frozen=True)
class KeyRotation:
    """client -> cloud: a tenant's new CKKS public context, to replace the one the cloud holds.

    The client keeps encrypting under ``previous_key_id`` until the cloud reports holding
    ``key_id`` (:meth:`SecureClientParty.confirm_key_rotation`), so a rotation lost on the way
    changes nothing.

    Attributes:
        tenant: tenant id.
        previous_key_id: the key id the rotation replaces (the one the cloud must hold now).
        key_id: the new key's id (16 bytes, the hash of ``he_public``).
        he_public: the new public context (``ClientKeys.public_bytes``): parameters and public
            key, never a secret key.
    """

    tenant: str
    previous_key_id: bytes
    key_id: bytes
    he_public: bytes


@dataclass(frozen=True)
class DealerRegistration:
    """cloud -> dealer: a tenant's public keys and adapter dimensions."""

    tenant: str
    client_public: bytes
    cloud_public: bytes
    dims: tuple[int, int, int, int]
    train_head: bool
    tail_pooled: bool = False


@dataclass(frozen=True)
class MaterialRequest:
    """cloud -> dealer: Beaver material for one step of a tenant (public shape data only)."""

    tenant: str
    step: int
    batch: int
    tokens: int
    train: bool
    rows: int = 0


@dataclass(frozen=True)
class MaterialBundle:
    """dealer -> cloud: the cloud's correction tensors ``masked_c`` for every product of a step,
    sealed to the cloud (:mod:`flower_split.protocol.material_seal`: AES-256-GCM under a key
    only the dealer and the cloud derive), in the order of ``secure_steps.material_keys``.

    The cloud derives its own seeds; the client derives its material entirely from its
    dealer key, so nothing of the client's material exists here.
    """

    tenant: str
    step: int
    sealed: bytes


def client_step_number(own_next: int, cloud_step: object, who: str) -> int:
    """The number of a client's next step, given the lowest one the cloud accepts.

    ``cloud_step`` below or at ``own_next``: ``own_next``. :data:`RESUME_JUMP_MIN` to
    :data:`RESUME_STEP_GAP` above it: the cloud restarted from saved state and skipped ahead
    (``SecureCloudParty.skip_steps``), and its number is beyond every number this client used
    unless its own state is over 2^19 steps stale. A little above it: this client's state is
    older than the cloud's (a backup restored), its next number was used, and reusing it would
    open the difference of two inputs: ProtocolError, before anything is opened. Further
    above: no restart skips that far (a cloud exhausting the step space): ProtocolError.
    """
    cloud_step = check_step(cloud_step, 0, MAX_STEP, f"{who}: the cloud's next step")
    if own_next < cloud_step:
        if cloud_step - own_next > RESUME_STEP_GAP:
            raise ProtocolError(f"{who}: the cloud expects step >= {cloud_step}, {cloud_step - own_next} past this "
                                f"client's next step {own_next}: more than a restarted cloud skips ({RESUME_STEP_GAP})")
        if cloud_step - own_next < RESUME_JUMP_MIN:
            raise ProtocolError(f"{who}: the cloud expects step >= {cloud_step}, this client's next step is "
                                f"{own_next}: its state is older than the cloud's (restored?); refusing to reuse "
                                "a step number (set the tenant up again)")
        own_next = cloud_step
    check_step(own_next, 0, MAX_STEP, f"{who}: next step")
    return own_next


def past_dealt_ahead(step: int, ahead: object, train: bool, shape: tuple[int, int, int], who: str) -> int:
    """``step``, or ``step + 1`` when the cloud holds material dealt ahead for number ``step``
    that this step cannot use: an evaluation, or a training batch of another shape.

    ``ahead``: the cloud's (step, batch, tokens, rows) of the training step whose material it asked
    ahead (``SecureCloudParty.prefetch_request``), or None. The dealer deals a number once, so
    the cloud refuses any other use of it; a tenant dropped mid-step, or restarted, may begin
    an evaluation or another batch next, and moves past the number before opening anything.
    Moving past only skips a number (the cloud accepts any larger one): none is used twice.
    """
    if ahead is None:
        return step
    if not isinstance(ahead, tuple) or len(ahead) != 4 \
            or any(isinstance(v, bool) or not isinstance(v, int) for v in ahead):
        raise ProtocolError(f"{who}: the cloud's material ahead must be (step, batch, tokens, rows), got {ahead!r}")
    if ahead[0] != step or (train and ahead[1:] == shape):
        return step
    return check_step(step + 1, 0, MAX_STEP, f"{who}: next step past the one dealt ahead")
