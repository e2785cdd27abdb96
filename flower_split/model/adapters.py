"""Trainable adapters around the frozen body: the head (before it) and the tail (after it).

Both use only linear maps and a low-degree polynomial activation, so the 2PC engine can
evaluate them exactly on secret shares (one Beaver product per activation).
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import nn

from flower_split.config import TAIL_INPUTS

_INSECURE_INIT_LABEL = b"flower-split/insecure-reproducible-init/v1"


class InitRandom:
    """The source of the adapters' random initial weights: AES-256-CTR under a 32-byte key.

    ``InitRandom()`` takes its key from the OS CSPRNG (:mod:`secrets`), so only this tenant
    can replay its draws. That is what keeps the head secret in secure mode: everything else
    that shapes the head's trajectory (optimizer settings, the embedder, ``dL/df``) is known to
    the cloud, so a start it could compute (from a seed, the run config or the partition)
    would let it track the head step by step and invert ``f`` into tokens (docs/secure.md §2).
    Not a ``torch.Generator``: torch seeds its Mersenne twister from the low 32 bits of the
    seed only (``manual_seed(s)`` and ``manual_seed(s + 2**32)`` give the same stream), so even
    an OS-random seed would leave 2^32 starts to try.

    :meth:`insecure_from_seed` derives the key from public integers instead: exactly
    reproducible runs (tests, benchmarks) whose start the cloud can compute just as well.
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = secrets.token_bytes(32) if key is None else key
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("InitRandom: the key must be 32 bytes")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    @classmethod
    def insecure_from_seed(cls, *seeds: int) -> "InitRandom":
        """A stream that anyone knowing ``seeds`` (the cloud included) reproduces."""
        return cls(hashlib.sha256(_INSECURE_INIT_LABEL + repr(tuple(int(s) for s in seeds)).encode()).digest())

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        """Uniform float32 draws in ``[low, high)`` (53 random bits each)."""
        return (low + (high - low) * self._unit(math.prod(shape))).reshape(shape).float()

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        """Normal float32 draws with mean 0 and standard deviation ``std`` (Box-Muller)."""
        count = math.prod(shape)
        u = self._unit(2 * count)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:count]))  # 1 - u in (0, 1]: log is finite
        return (std * radius * torch.cos(2.0 * math.pi * u[count:])).reshape(shape).float()

    def _unit(self, count: int) -> torch.Tensor:
        words = np.frombuffer(self._encryptor.update(bytes(8 * count)), dtype="<u8")
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64)) * 2.0**-53


def adapter_random(insecure_reproducible: bool, seed: int, *stream: int) -> InitRandom:
    """The tenant's CSPRNG; with the insecure opt-in, a stream derived from ``(seed, *stream)``."""
    return InitRandom.insecure_from_seed(seed, *stream) if insecure_reproducible else InitRandom()

# act(u) = c0 + c1 u + c2 u^2: least-squares fit of GELU on [-4, 4] (c = 0.257, 0.5, 0.128),
# rounded to values that are exact in fixed point.
QUAD_COEFFS = (0.25, 0.5, 0.125)


class PolyActivation(nn.Module):
    """Polynomial activation ``sum_k c_k u^k`` with public coefficients."""

    def __init__(self, coeffs: tuple[float, ...] = QUAD_COEFFS) -> None:
        super().__init__()
        self.coeffs = tuple(float(c) for c in coeffs)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(u, self.coeffs[-1])
        for c in reversed(self.coeffs[:-1]):  # Horner
            out = out * u + c
        return out


def make_activation(name: str) -> nn.Module:
    """``quad`` (2PC-friendly, default) or ``gelu`` (plaintext experiments only)."""
    if name == "quad":
        return PolyActivation()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation: unknown {name!r} (expected 'quad' or 'gelu')")


class ResidualAdapter(nn.Module):
    """``x + act(x A) B`` per token; ``B`` starts at zero so the adapter starts as identity.

    ``A`` is the only random part: N(0, 1/dim) from ``rng`` (a fresh :class:`InitRandom` when
    None); torch's global RNG is never used.
    """

    def __init__(self, dim: int, rank: int, activation: str = "quad", rng: InitRandom | None = None) -> None:
        super().__init__()
        rng = InitRandom() if rng is None else rng
        self.down = nn.utils.skip_init(nn.Linear, dim, rank, bias=False)
        self.up = nn.utils.skip_init(nn.Linear, rank, dim, bias=False)
        self.act = make_activation(activation)
        with torch.no_grad():
            self.down.weight.copy_(rng.normal((rank, dim), dim ** -0.5))
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class HeadAdapter(ResidualAdapter):
    """Between the public embeddings and the body: ``f = e + act(e A) B``.

    The cloud sees ``f``; input privacy needs weights the cloud cannot know (see DESIGN §7).
    """


class TailAdapter(nn.Module):
    """After the body: residual bottleneck, masked mean pooling, classifier.

    ``tail_input="tokens"`` runs the bottleneck on every token before pooling;
    ``"pooled"`` pools first and runs it once per sequence: the same parameters, a
    T-times smaller product (which is what the 2PC evaluation pays for), and a tail that
    matches how sentence encoders such as all-MiniLM-L6-v2 were trained (mean pooling).
    """

    def __init__(self, dim: int, bottleneck: int, num_classes: int, activation: str = "quad",
                 tail_input: str = "tokens", rng: InitRandom | None = None,
                 prior: torch.Tensor | None = None) -> None:
        super().__init__()
        if prior is not None and tuple(prior.shape) != (num_classes,):
            raise ValueError(f"prior: expected shape ({num_classes},), got {tuple(prior.shape)}")
        if tail_input not in TAIL_INPUTS:
            raise ValueError(f"tail_input: expected one of {TAIL_INPUTS}, got {tail_input!r}")
        rng = InitRandom() if rng is None else rng
        self.tail_input = tail_input
        self.adapter = ResidualAdapter(dim, bottleneck, activation, rng)
        # nn.Linear's default distribution, U(-1/sqrt(dim), 1/sqrt(dim)) for weight and bias, from rng
        self.classifier = nn.utils.skip_init(nn.Linear, dim, num_classes)
        bound = dim ** -0.5
        with torch.no_grad():
            self.classifier.weight.copy_(rng.uniform((num_classes, dim), -bound, bound))
            self.classifier.bias.copy_(rng.uniform((num_classes,), -bound, bound))
        # the tenant's prior offset (flower_split.model.prior), added to the logits; None: off.
        # A buffer: saved with the tail, never trained, never averaged.
        self.register_buffer("prior", None if prior is None else prior.float().clone())

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.tail_input == "pooled":
            return self.from_pooled(masked_mean(h, attention_mask))
        return self._offset(self.classifier(masked_mean(self.adapter(h), attention_mask)))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from the body output already mean-pooled over the real tokens [B, d] (a
        ``"pooled"`` tail only: the cloud may pool before sending, ``HeadOutput.pool``)."""
        if self.tail_input != "pooled":
            raise ValueError("from_pooled: this tail runs on every token (tail_input='tokens')")
        return self._offset(self.classifier(self.adapter(pooled)))

    def _offset(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.prior is None else logits + self.prior


def pack_tokens(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values`` [batch, tokens, d] at the real tokens (the mask's ones), row-major: [rows, d].

    Padding positions cannot change the body's output at real tokens (attention masks them as
    keys, the pool skips them), so a per-token tensor travels without them.
    """
    return values[attention_mask.to(torch.bool)]


def unpack_tokens(rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[rows, d] back to [batch, tokens, d], zero at the padding (:func:`pack_tokens`'s inverse)."""
    select = attention_mask.to(torch.bool)
    out = rows.new_zeros((*select.shape, rows.shape[-1]))
    out[select] = rows
    return out


def masked_mean(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real (unpadded) tokens of each sequence."""
    weights = attention_mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def masked_mean_backward(grad: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`masked_mean` w.r.t. its input: ``grad`` [batch, dim] spread over the real tokens."""
    weights = attention_mask.to(grad.dtype).unsqueeze(-1)
    return grad.unsqueeze(1) * weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
