"""What cross-tenant sharing averages, and how each mode's parameters pass through SecAgg+.

Both sides (the cloud's :mod:`~flower_split.flower.sharing_server` and the tenants'
:mod:`~flower_split.flower.sharing_client`) take the names and the encodings from here.

**Names.** ``share = "tail"``: the tail adapter without the classifier; ``"head-tail"``: head
and tail adapters; the classifier stays personal (FedPer / FedRep). ``"all"``: the classifier
too, but not after the last round: each tenant keeps the copy it fine-tuned from the average in
the last round (:data:`FINE_TUNED_COPY`).

**Plain.** Flower's SecAgg+ quantizes each float into ``[-clip, clip]`` with
:data:`PLAIN_QUANTIZATION` (2^22 levels over ``[-8, 8]``: stochastic rounding, error
< 3.9e-6 per value and tenant, so < 3.9e-6 on the mean). Every tenant has weight 1
(``num_examples = max_weight = 1``: the plain mean, no example counts revealed). A value
outside ``[-8, 8]`` would be clipped silently: the tenant refuses instead (it is dropped
from the aggregation, not averaged wrongly).

**Secure.** A tenant's halves are uniform int64 ring elements (Z_2^64, ``frac_bits``
fixed point); SecAgg+ sums integers modulo its ``modulus_range``. With modulus 2^31,
quantization range 2^31 - 1 and clipping range (2^31 - 1) / 2 the quantizer is exactly 1,
so each value ``u = half mod 2^31`` (0 .. 2^31 - 1, exact in float64) is carried unchanged
and the unmasked aggregate is ``C31 = sum_i c_i mod 2^31``: a modular sum, so it reveals
nothing of the carries. The cloud adds its own halves' sum ``S`` and lifts: as long as
``|sum_i x_i| < 2^30`` in the ring (``|sum of the tenants' values| < 2^(30 - frac_bits)``,
16384 at 16 fractional bits), ``X = signed(C31 + S mod 2^31)`` is the exact ring sum of
the adapters and ``C = X - S`` the full aggregate of the tenants' halves
(:func:`lift_tenant_sum`). Then each side averages its own halves
(:func:`average_half`, SecureML local division): the tenants' ``-floor(-C / n)`` plus the
cloud's ``floor(S / n)`` is the mean adapter within one LSB (2^-frac_bits), failing only
with probability about ``|X| / 2^64`` (the local truncation's wrap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flower_split.flower.settings import FINE_TUNED_COPY  # noqa: F401  (re-exported: the sides take it from here)
from flower_split.mpc import AdditiveShare

PLAIN_QUANTIZATION = {"clipping_range": 8.0, "quantization_range": 1 << 22, "modulus_range": 1 << 32}
"""SecAgg+ parameters of split-plain (Flower's defaults); at most 1023 tenants (n * 2^22 < 2^32)."""

RING_BITS_SHARED = 31
RING_MOD = 1 << RING_BITS_SHARED
SECURE_QUANTIZATION = {"clipping_range": (RING_MOD - 1) / 2, "quantization_range": RING_MOD - 1,
                       "modulus_range": RING_MOD}
"""SecAgg+ parameters of split-secure: quantizer exactly 1, sums modulo 2^31 (see the module docstring)."""

HALVES = {"plain": False, "secure": True}
"""The sharing registry: does a security level share secret-shared ring halves (else floats)?"""

PLAIN_NAMES = {"tail": ("tail.adapter.down.weight", "tail.adapter.up.weight"),
               "head-tail": ("head.down.weight", "head.up.weight", "tail.adapter.down.weight",
                             "tail.adapter.up.weight"),
               "all": ("head.down.weight", "head.up.weight", "tail.adapter.down.weight", "tail.adapter.up.weight",
                       "tail.classifier.weight", "tail.classifier.bias")}
SECURE_NAMES = {"tail": ("tail.A", "tail.B"), "head-tail": ("head.A", "head.B", "tail.A", "tail.B"),
                "all": ("head.A", "head.B", "tail.A", "tail.B", "cls.Wc", "cls.bc")}



def shared_names(security: str, scope: str) -> tuple[str, ...]:
    """The parameter names ``scope`` shares in ``security`` mode, in the order they travel."""
    table = SECURE_NAMES if halves(security) else PLAIN_NAMES
    if scope not in table:
        raise ValueError(f"share: no parameters to share for {scope!r} (expected one of {', '.join(table)})")
    return table[scope]


@dataclass(frozen=True)
class Quantization:
    """One mode's SecAgg+ quantization (``clipping_range``, ``quantization_range``, ``modulus_range``)."""

    clipping_range: float
    quantization_range: int
    modulus_range: int


def quantization(security: str) -> Quantization:
    """The SecAgg+ quantization of ``security`` mode."""
    return Quantization(**(SECURE_QUANTIZATION if halves(security) else PLAIN_QUANTIZATION))


def halves(security: str) -> bool:
    """Whether ``security`` shares ring halves (:data:`HALVES`); a ValueError for an unknown level."""
    if security not in HALVES:
        raise ValueError(f"share: no sharing for security level {security!r}")
    return HALVES[security]


# -- secure: halves through SecAgg+ ----------------------------------------------------------------

def encode_half(half: torch.Tensor) -> np.ndarray:
    """A tenant's int64 half as SecAgg+ input: ``half mod 2^31`` shifted by the clipping range
    (float64, exact), so that Flower's quantizer maps it back onto ``half mod 2^31``."""
    low = torch.remainder(half, RING_MOD).to(torch.float64).numpy()
    return low - SECURE_QUANTIZATION["clipping_range"]


def decode_sum(aggregate: np.ndarray, count: int) -> torch.Tensor:
    """``sum_i half_i mod 2^31`` from what Flower's SecAgg+ workflow hands ``aggregate_fit``.

    The workflow dequantizes ``R = sum_i q_i mod 2^31`` to ``(R - n * clip) * T / (n * T mod
    2^31)`` (its weight factor wraps too: each tenant's is ``T = 2^31 - 1``); this inverts it.
    """
    clip, total = SECURE_QUANTIZATION["clipping_range"], SECURE_QUANTIZATION["quantization_range"]
    factor = (count * total) % RING_MOD
    residues = np.rint(np.asarray(aggregate, dtype=np.float64) * factor / total + count * clip)
    return torch.from_numpy(np.mod(residues, RING_MOD).astype(np.int64))


def lift_tenant_sum(tenant_sum31: torch.Tensor, cloud_sum: torch.Tensor) -> torch.Tensor:
    """The tenants' halves' full ring sum ``C`` from ``C mod 2^31`` and the cloud's halves' sum ``S``
    (exact while ``|C + S| < 2^30`` as a signed ring integer)."""
    total31 = torch.remainder(tenant_sum31 + torch.remainder(cloud_sum, RING_MOD), RING_MOD)
    signed = torch.where(total31 >= RING_MOD // 2, total31 - RING_MOD, total31)
    return signed - cloud_sum  # int64: wraps modulo 2^64


def average_half(half_sum: torch.Tensor, count: int, party: int, frac_bits: int) -> torch.Tensor:
    """One party's half of the mean: its halves' sum divided by ``count`` locally
    (party 0, the cloud: floor; party 1, the tenant: -floor(-x)); the two results add up to the
    mean adapter within one LSB (:meth:`AdditiveShare.div_public`)."""
    return AdditiveShare(half_sum, party, frac_bits).div_public(count).data


def ring_sum(halves: list[torch.Tensor]) -> torch.Tensor:
    """The sum of int64 ring tensors modulo 2^64."""
    total = torch.zeros_like(halves[0])
    for half in halves:
        total = total + half
    return total
