"""Label-DP: Gaussian noise on ``g = dL/dz`` where the tenant forms it, and the count of label uses.

The label enters a training step only through ``g = (softmax(z) - onehot(y)) / B`` (mean
cross-entropy over a batch of ``B``; ``z`` does not depend on the step's labels). Changing one
example's label changes its row of ``g`` by ``(onehot(y) - onehot(y')) / B``, whose L2 norm
is exactly ``sqrt(2) / B``, and no other row: the sensitivity, with no clipping (the
``softmax(z)`` part does not depend on the label). The tenant adds ``N(0, (sigma sqrt(2)/B)^2)``
to every entry of ``g`` before anything uses it, so every later value (``dL/dh`` opened to the
cloud, the tail and head updates, the logits of later steps) is post-processing of one
Gaussian mechanism with noise multiplier ``sigma`` per use of each label
(docs/PRIVACY.md, "Label-DP"). The noise comes from the OS CSPRNG (``os.urandom``) through the
Box-Muller transform, never from torch's seeded global generator. Where the tenant knows the
logits (split-plain, secure ``client``) it then replaces the noisy ``g`` by its posterior mean
(:meth:`LabelNoise.denoised`), which is post-processing and keeps training stable.

:class:`LabelNoise` also counts how often each example's label was used; the privacy loss
composes over the uses of the most used example (:func:`label_dp_epsilon`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from flower_split.mpc import encode, random_ring
from flower_split.protocol.dp_accountant import label_dp_epsilon

_MANTISSA_BITS = 53


def label_sensitivity(batch: int) -> float:
    """L2 change of one row of ``g = (softmax(z) - onehot(y)) / batch`` when its label changes."""
    return math.sqrt(2) / batch


def gaussian_noise(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float64 noise of ``shape`` from ``os.urandom`` (Box-Muller)."""
    bits = random_ring((2, *shape))
    uniform = (((bits >> (64 - _MANTISSA_BITS)) & ((1 << _MANTISSA_BITS) - 1)).to(torch.float64) + 0.5) \
        / 2.0 ** _MANTISSA_BITS  # in (0, 1): the log below is finite
    return torch.sqrt(-2.0 * torch.log(uniform[0])) * torch.cos(2.0 * math.pi * uniform[1])


class LabelNoise:
    """One tenant's label-DP mechanism: noise multiplier ``sigma``, target ``delta``, label uses.

    Only the tenant holds it; nothing of it is sent (the cloud sees only noisy values).
    """

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
                and noise_multiplier > 0):
            raise ValueError(f"label_dp_noise: expected a finite number > 0, got {noise_multiplier!r}")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"label_dp_delta: expected a number in (0, 1), got {delta!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self._uses = torch.zeros(0, dtype=torch.int64)

    @classmethod
    def from_config(cls, config: Any) -> "LabelNoise | None":
        """The mechanism a :class:`~flower_split.config.RunConfig` asks for; None when ``label_dp_noise`` is 0."""
        if not config.label_dp_noise:
            return None
        return cls(config.label_dp_noise, config.label_dp_delta)

    def sample(self, shape: tuple[int, int]) -> torch.Tensor:
        """Noise (float64) for a ``g`` of ``shape`` [B, C]: std ``sigma * sqrt(2) / B`` per entry."""
        if len(shape) != 2 or shape[0] < 1:
            raise ValueError(f"label-DP: g must have shape [B, C], got {tuple(shape)}")
        return gaussian_noise(tuple(shape)) * (self.noise_multiplier * label_sensitivity(shape[0]))

    def count(self, indices: torch.Tensor) -> None:
        """Record one use of the labels of the examples ``indices`` (their positions in the tenant's data)."""
        indices = indices.detach().cpu().to(torch.int64).reshape(-1)
        if not indices.numel():
            return
        if int(indices.min()) < 0:
            raise ValueError("label-DP: example indices must be >= 0")
        size = int(indices.max()) + 1
        if size > len(self._uses):
            self._uses = torch.cat([self._uses, torch.zeros(size - len(self._uses), dtype=torch.int64)])
        self._uses.index_add_(0, indices, torch.ones_like(indices))

    def denoised(self, g: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Noisy ``g`` [B, C], then its posterior-mean denoising given the logits ``z``: ``(p - q) / B``.

        ``p = softmax(z)`` does not depend on the step's labels, so from the noisy row
        ``(p - e_y)/B + n`` the tenant gets ``v = p - B * noisy = e_y - B n`` with ``B n ~ N(0, s^2 I)``,
        ``s^2 = 2 sigma^2``; the posterior of the label with prior ``p`` is
        ``q = softmax(log p + v / s^2)``, and ``(p - q) / B`` is the cross-entropy gradient against the
        soft label ``q``. A function of the mechanism's output and of label-independent values
        (post-processing: the guarantee is unchanged), bounded like a true ``g`` (row norm at most
        ``sqrt(2) / B``), so training stays stable at any ``sigma`` where the raw noise (row norm
        about ``sigma sqrt(2C) / B``) makes it diverge.
        """
        batch = g.shape[0]
        noisy = g.to(torch.float64) + self.sample(tuple(g.shape)).to(g.device)
        log_p = torch.log_softmax(logits.detach().to(g.device, torch.float64), dim=-1)
        p = log_p.exp()
        q = torch.softmax(log_p + (p - batch * noisy) / (2 * self.noise_multiplier ** 2), dim=-1)
        return ((p - q) / batch).to(g.dtype)

    def logits_hook(self, logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Autograd hook for the logits ``z``: replaces ``g`` by its noisy, denoised version
        (:meth:`denoised`; split-plain, which counts the use when the step begins)."""
        def add_noise(grad: torch.Tensor) -> torch.Tensor:
            return self.denoised(grad, logits)
        return add_noise

    @property
    def max_uses(self) -> int:
        """Uses of the most used example's label: the number of mechanisms its privacy loss composes."""
        return int(self._uses.max()) if len(self._uses) else 0

    def epsilon(self) -> float:
        """The (epsilon, ``delta``) label-DP guarantee so far, from the RDP accountant."""
        return label_dp_epsilon(self.noise_multiplier, self.max_uses, self.delta)

    def summary(self) -> dict[str, float | int]:
        """The results.json entries: ``label_dp_noise``, ``label_dp_delta``, ``label_dp_uses``, ``label_dp_epsilon``."""
        return {"label_dp_noise": self.noise_multiplier, "label_dp_delta": self.delta,
                "label_dp_uses": self.max_uses, "label_dp_epsilon": self.epsilon()}

    def state_dict(self) -> dict[str, Any]:
        """The use counts (the noise has no state to keep: every draw is fresh OS entropy)."""
        return {"noise_multiplier": self.noise_multiplier, "uses": self._uses.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ValueError if it was saved with another noise multiplier."""
        if float(state["noise_multiplier"]) != self.noise_multiplier:
            raise ValueError(f"state: label_dp_noise is {state['noise_multiplier']!r}, "
                             f"this party has {self.noise_multiplier!r}")
        self._uses = state["uses"].to(torch.int64).clone()


def restore_label_noise(noise: LabelNoise | None, saved: dict[str, Any] | None) -> None:
    """Load a party's saved label uses; ValueError if label-DP was on in one and off in the other."""
    if (noise is None) != (saved is None):
        raise ValueError("state: saved with label-DP " + ("on" if noise is None else "off")
                         + f", this party has it {'off' if noise is None else 'on'} (label_dp_noise)")
    if noise is not None and saved is not None:
        noise.load_state_dict(saved)


def noisy_g(noise: LabelNoise | None, g: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``g`` [B, C] noised and denoised (:meth:`LabelNoise.denoised`); ``g`` itself when label-DP is
    off (secure ``client`` mode, where the logits are opened to the tenant)."""
    return g if noise is None else noise.denoised(g, logits)


def noisy_share(noise: LabelNoise | None, share: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """A ring share [B, C] of ``g`` (``frac_bits`` fractional bits) plus the encoded noise: the
    shares then sum to the noisy ``g``; the share itself when label-DP is off (secure ``he`` mode,
    where the tenant has no logits to denoise with: the raw noisy ``g`` is used)."""
    return share if noise is None else share + encode(noise.sample(tuple(share.shape)), frac_bits)


def label_dp_summary(noise: LabelNoise | None) -> dict[str, Any]:
    """:meth:`LabelNoise.summary`, or ``label_dp_epsilon: None`` (no guarantee) when label-DP is off."""
    return {"label_dp_epsilon": None} if noise is None else noise.summary()
