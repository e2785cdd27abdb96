"""CKKS parameters for the encrypted-label loss, and the bounds they imply.

One :class:`HEParams` describes a tenant's encryption parameters. It is public: the
cloud receives it with the public key. :func:`batch_bounds` turns it, the actual SEAL
primes and a batch shape into the numbers that matter — precision of the decrypted loss
and gradient share, and the statistical hiding of the cloud's and the client's secrets —
and refuses shapes the parameters cannot carry. The derivations are in ``docs/he.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import tenseal.sealapi as seal

#: Largest total coefficient-modulus size in bits (special prime included) for 128-bit
#: classical security with a ternary secret, HomomorphicEncryption.org standard
#: (Albrecht et al., 2018, Table 1). SEAL enforces the same table.
HE_STANDARD_MAX_LOGQ_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Smallest statistical security parameter accepted (the cloud parses a tenant's parameters
#: with this class, so a tenant cannot pick a weaker flooding of its decrypted values).
MIN_STAT_SEC = 40

#: Standard deviation of SEAL's fresh-encryption noise (centred binomial, 21 coin pairs).
NOISE_SIGMA = 3.24
#: Largest magnitude that noise can take.
NOISE_MAX = 21
#: Tail factor: the noise is sub-Gaussian, so |<e, d>| <= TAIL_T * NOISE_SIGMA * ||d||_2
#: except with probability 2 exp(-TAIL_T**2 / 2) < 2**-45.
TAIL_T = 8.0


@dataclass(frozen=True)
class HEParams:
    """Encryption parameters of one tenant (all public).

    Attributes:
        poly_modulus_degree: ring degree N; one ciphertext packs N label entries.
        data_prime_bits: bit sizes of the data primes ``q0, q1, ..., q_last``. Labels are
            encrypted under their product; the gradient ciphertext is rescaled by
            ``q_last``; the loss ciphertext is rescaled by ``q_last`` and then reduced to
            ``q0`` alone. At least two.
        special_prime_bits: bit size of SEAL's special (key-level) prime. It only lowers
            the noise of the cloud's public-key encryptions of zero.
        label_scale_bits: the client encodes a label entry ``y`` as ``y * 2**label_scale_bits``.
            Large, because it sets the precision left after the loss is flooded.
        logprob_frac_bits: fractional bits of the cloud's fixed-point ``-log_softmax``.
        max_neg_log_prob: ``-log_softmax`` is clamped to ``[0, max_neg_log_prob]`` before
            encoding, which bounds the loss ciphertext (only samples whose true-class
            probability is below ``exp(-max_neg_log_prob)`` are affected).
        frac_bits: fractional bits of the fixed-point ring Z_2^64 the gradient shares use.
        stat_sec: statistical security parameter: the client's view of the loss and of its
            gradient share is within statistical distance ``2**-stat_sec`` of a view that
            depends only on what it is meant to learn.
    """

    poly_modulus_degree: int = 8192
    data_prime_bits: tuple[int, ...] = (60, 32, 29)
    special_prime_bits: int = 30
    label_scale_bits: int = 62
    logprob_frac_bits: int = 10
    max_neg_log_prob: float = 32.0
    frac_bits: int = 16
    stat_sec: int = 40

    def __post_init__(self) -> None:
        for name in ("poly_modulus_degree", "special_prime_bits", "label_scale_bits", "logprob_frac_bits",
                     "frac_bits", "stat_sec"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r}: must be an integer")
        n = self.poly_modulus_degree
        if n not in HE_STANDARD_MAX_LOGQ_128:
            raise ValueError(
                f"poly_modulus_degree={n}: must be one of {sorted(HE_STANDARD_MAX_LOGQ_128)}"
            )
        object.__setattr__(self, "data_prime_bits", tuple(int(b) for b in self.data_prime_bits))
        if len(self.data_prime_bits) < 2:
            raise ValueError("data_prime_bits: need at least two data primes (q0 and a rescale prime)")
        for b in (*self.data_prime_bits, self.special_prime_bits):
            if not 20 <= b <= 60:
                raise ValueError(
                    f"data_prime_bits/special_prime_bits: {b} bits is outside SEAL's usable 20..60"
                )
        total = self.total_modulus_bits
        if total > HE_STANDARD_MAX_LOGQ_128[n]:
            raise ValueError(
                f"data_prime_bits + special_prime_bits = {total} bits exceeds "
                f"{HE_STANDARD_MAX_LOGQ_128[n]}, the 128-bit HE-standard bound for N={n}"
            )
        if not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits={self.frac_bits}: must be in 0..30")
        if not self.frac_bits <= self.label_scale_bits <= min(62, sum(self.data_prime_bits) - 3):
            raise ValueError(
                f"label_scale_bits={self.label_scale_bits}: must be >= frac_bits, <= 62 (int64 "
                f"encoding) and leave room below the {sum(self.data_prime_bits)}-bit data modulus"
            )
        if not 0 <= self.logprob_frac_bits <= 30:
            raise ValueError(f"logprob_frac_bits={self.logprob_frac_bits}: must be in 0..30")
        if not 0 < self.max_neg_log_prob <= 1024:
            raise ValueError(f"max_neg_log_prob={self.max_neg_log_prob}: must be in (0, 1024]")
        if not MIN_STAT_SEC <= self.stat_sec <= 128:
            raise ValueError(f"stat_sec={self.stat_sec}: must be in {MIN_STAT_SEC}..128")

    @property
    def total_modulus_bits(self) -> int:
        """Bits of the whole coefficient modulus (what the security table bounds)."""
        return sum(self.data_prime_bits) + self.special_prime_bits

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), so equal parameters give equal bytes."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> HEParams:
        """Inverse of :meth:`to_json`; unknown or missing fields raise ValueError."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"HE parameters: not a valid HEParams JSON ({exc})") from exc
        expected = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(fields, dict) or set(fields) != expected:
            got = set(fields) if isinstance(fields, dict) else set()
            raise ValueError(
                f"HE parameters: not a valid HEParams JSON (missing {sorted(expected - got)}, "
                f"unknown {sorted(got - expected)})"
            )
        try:
            fields["data_prime_bits"] = tuple(fields["data_prime_bits"])
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(f"HE parameters: not a valid HEParams JSON ({exc})") from exc


@lru_cache(maxsize=16)
def coeff_primes(params: HEParams) -> tuple[int, ...]:
    """The primes SEAL picks for ``params`` (data primes, then the special prime)."""
    bits = [*params.data_prime_bits, params.special_prime_bits]
    return tuple(m.value() for m in seal.CoeffModulus.Create(params.poly_modulus_degree, bits))


def ring_unit(params: HEParams, batch_size: int) -> int:
    """One ring LSB of g = (softmax - onehot) / B, in units of the label encoding:
    2**label_scale_bits * 2**-frac_bits * B. Both parties convert with it."""
    return (1 << (params.label_scale_bits - params.frac_bits)) * batch_size


def num_ciphertexts(batch_size: int, num_classes: int, poly_modulus_degree: int) -> int:
    """Ciphertexts needed for a [batch_size, num_classes] one-hot block packed densely."""
    return -(-batch_size * num_classes // poly_modulus_degree)


@dataclass(frozen=True)
class BatchBounds:
    """What one batch shape costs and guarantees under given parameters.

    Attributes:
        num_ciphertexts: label (and gradient) ciphertexts per batch; plus one loss ciphertext.
        flood_bits: the loss's constant coefficient is flooded with noise uniform in
            ``[-2**flood_bits, 2**flood_bits]``.
        grad_mask_range: the cloud's gradient mask (in its fixed-point units) is uniform in
            ``[-grad_mask_range, grad_mask_range)``.
        loss_abs_error: bound on |decrypted mean loss - mean cross-entropy of the clamped
            log-probabilities|.
        grad_error_lsb: bound on |client share + cloud share - 2**frac_bits * g| (ring units).
        loss_hiding_bits: -log2 of the statistical distance that hides the per-sample
            losses and log-probabilities from the client (flooding; 2**-45 tail included).
        grad_hiding_bits: -log2 of the statistical distance that hides softmax(z) from the
            client's gradient share, whole batch.
    """

    batch_size: int
    num_classes: int
    num_ciphertexts: int
    flood_bits: int
    grad_mask_range: int
    loss_abs_error: float
    grad_error_lsb: float
    loss_hiding_bits: float
    grad_hiding_bits: float


def batch_bounds(params: HEParams, batch_size: int, num_classes: int) -> BatchBounds:
    """Bounds for one [batch_size, num_classes] batch; ValueError if it does not fit.

    Loss (constant coefficient c0 of the summed products, scale S = 2**(label+logprob bits)):
    c0 = S * sum(y * a) + <e, A> + enc0 + flood. The client knows its noise e, so <e, A>
    leaks one projection of the log-probabilities A; the flood, uniform of half-width
    2**stat_sec * D with D a tail bound on that leak, hides it. Gradient: the client sees
    V - mu with |V| <= 2**label_scale_bits and mu uniform of half-width R*U, so each
    coefficient is hidden to distance |V|/(R*U).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: must be >= 2")
    flood_bits, loss_abs_error, loss_hiding_bits = _loss_bounds(params, batch_size, num_classes)
    mask_range, grad_error_lsb, grad_hiding_bits = _grad_bounds(params, batch_size, num_classes)
    return BatchBounds(
        batch_size=batch_size,
        num_classes=num_classes,
        num_ciphertexts=num_ciphertexts(batch_size, num_classes, params.poly_modulus_degree),
        flood_bits=flood_bits,
        grad_mask_range=mask_range,
        loss_abs_error=loss_abs_error,
        grad_error_lsb=grad_error_lsb,
        loss_hiding_bits=loss_hiding_bits,
        grad_hiding_bits=grad_hiding_bits,
    )


def _loss_bounds(params: HEParams, batch_size: int, num_classes: int) -> tuple[int, float, float]:
    """The loss ciphertext: (flood bits, absolute error of the decrypted loss, hiding bits)."""
    n_poly = params.poly_modulus_degree
    data = coeff_primes(params)[:-1]
    q0, q_last = data[0], data[-1]
    entries = batch_size * num_classes
    scale = 1 << (params.label_scale_bits + params.logprob_frac_bits)
    a_max = params.max_neg_log_prob
    a_step_max = 2**params.logprob_frac_bits * a_max + 1  # largest difference of two encoded entries
    leak = TAIL_T * NOISE_SIGMA * a_step_max * math.sqrt(entries)
    flood_bits = math.ceil(params.stat_sec + math.log2(leak))
    enc0_noise = n_poly + 2  # public-key encryption of zero after SEAL's divide-and-round
    rescale_noise = n_poly  # (1 + ||s||_1) / 2 rounded up
    c0_top = scale * batch_size * (a_max + 1) + 2**flood_bits + leak + enc0_noise
    c0_final = c0_top / q_last + rescale_noise
    if c0_final >= q0 / 2:
        raise ValueError(
            f"batch {batch_size}x{num_classes}: the loss would overflow the {q0.bit_length()}-bit "
            f"final modulus (needs {math.log2(c0_final) + 1:.1f} bits); lower batch_size, "
            "max_neg_log_prob or logprob_frac_bits"
        )
    loss_abs_error = (
        (2**flood_bits + leak + enc0_noise + rescale_noise * q_last) / scale / batch_size
        + 2.0 ** -(params.logprob_frac_bits + 1)
    )
    return flood_bits, loss_abs_error, -math.log2(leak / 2 ** (flood_bits + 1) + 2.0**-45)


def _grad_bounds(params: HEParams, batch_size: int, num_classes: int) -> tuple[int, float, float]:
    """The gradient ciphertexts: (mask range, error in units of the last place, hiding bits)."""
    data = coeff_primes(params)[:-1]
    q_top, q_last = math.prod(data), data[-1]
    label_scale = 1 << params.label_scale_bits
    unit = ring_unit(params, batch_size)
    mask_range = (q_top // 2 - 2 * label_scale) // unit
    per_entry = math.log2(mask_range * unit) - math.log2(label_scale + NOISE_MAX + 1)
    grad_hiding_bits = per_entry - math.log2(batch_size * num_classes)  # union bound over the batch
    if grad_hiding_bits < params.stat_sec:
        raise ValueError(
            f"batch {batch_size}x{num_classes}: gradient mask hides only {grad_hiding_bits:.1f} bits "
            f"< stat_sec={params.stat_sec}; use a smaller batch or a larger data modulus"
        )
    grad_error_lsb = 1.0 + (params.poly_modulus_degree * q_last + NOISE_MAX + 1) / unit
    return mask_range, grad_error_lsb, grad_hiding_bits
