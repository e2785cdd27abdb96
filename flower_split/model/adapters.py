"""Trainable adapters around the frozen body: the head (before it) and the tail (after it).

Both use only linear maps and a low-degree polynomial activation, so the 2PC engine can
evaluate them exactly on secret shares (one Beaver product per activation).
"""

from __future__ import annotations

import torch
from torch import nn

from flower_split.config import TAIL_INPUTS

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
    """``x + act(x A) B`` per token; ``B`` starts at zero so the adapter starts as identity."""

    def __init__(self, dim: int, rank: int, activation: str = "quad") -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.act = make_activation(activation)
        nn.init.normal_(self.down.weight, std=dim ** -0.5)
        nn.init.zeros_(self.up.weight)

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
                 tail_input: str = "tokens") -> None:
        super().__init__()
        if tail_input not in TAIL_INPUTS:
            raise ValueError(f"tail_input: expected one of {TAIL_INPUTS}, got {tail_input!r}")
        self.tail_input = tail_input
        self.adapter = ResidualAdapter(dim, bottleneck, activation)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.tail_input == "pooled":
            return self.classifier(self.adapter(masked_mean(h, attention_mask)))
        return self.classifier(masked_mean(self.adapter(h), attention_mask))


def masked_mean(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real (unpadded) tokens of each sequence."""
    weights = attention_mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def masked_mean_backward(grad: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`masked_mean` w.r.t. its input: ``grad`` [batch, dim] spread over the real tokens."""
    weights = attention_mask.to(grad.dtype).unsqueeze(-1)
    return grad.unsqueeze(1) * weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
