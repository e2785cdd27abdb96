"""Secure adapter math: forward and backward of the trainable modules as staged 2PC programs.

Residual low-rank adapter (head or tail), with a public quadratic activation:

    u = x A,   h = act(u) = c0 + c1 u + c2 u^2,   y = x + h B
    x [batch, tokens, dim], A [dim, rank], B [rank, dim]

Linear classifier:  z = p Wc + bc,  p [batch, dim], Wc [dim, classes], bc [classes].

Inputs, weights, outputs and gradients all stay additively shared; nothing is opened
except Beaver-masked differences.  Each program is built for fixed shapes and reads and
writes named values of a ``PartyState``:

=====================  ======  ===============================  ===========================
program                rounds  reads                            writes (besides temporaries)
=====================  ======  ===============================  ===========================
adapter_forward        3       x, A, B                          u, h (kept for backward), y
adapter_backward       3       gy, x, A, B, u, h                gA, gB, and gx if input_grad
classifier_forward     1       p, Wc, bc                        z
classifier_backward    1       gz, p, Wc                        gWc, gbc, and gp if input_grad
=====================  ======  ===============================  ===========================

Backward of the adapter (gy = dL/dy):  gB = h^T gy,  gh = gy B^T,  gu = gh * act'(u)
with act'(u) = c1 + 2 c2 u,  gA = x^T gu,  gx = gy + gu A^T (weight gradients summed
over batch and tokens).  ``mean_pool`` / ``mean_pool_backward`` connect the adapter
output to the classifier; they are local because the attention mask is public.

Fixed-point error: every product is exact in the ring and truncated once (< 1 LSB =
2^-f); errors then propagate linearly through later products.  The tests bound the
difference to float64 autograd by propagating 1 LSB per truncation through the
actual operand magnitudes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .share import AdditiveShare
from .masks import Use, View
from .stages import Product, Program, Stage, Values
from .triples import TripleRequest


@dataclass(frozen=True)
class Quadratic:
    """The public activation act(u) = c0 + c1 u + c2 u^2 (stays in arithmetic sharing)."""

    c0: float
    c1: float
    c2: float

    def __post_init__(self) -> None:
        for name in ("c0", "c1", "c2"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def __call__(self, u: Tensor) -> Tensor:
        """Plaintext act(u) (autograd-friendly, for references and the split-plain baseline)."""
        return self.c0 + self.c1 * u + self.c2 * u * u

    def secure(self, u: AdditiveShare, u_squared: AdditiveShare) -> AdditiveShare:
        """act(u) from shares of u and u^2: one truncation for both scalings."""
        scaled = u.mul_public(self.c1, truncate=False) + u_squared.mul_public(self.c2, truncate=False)
        return scaled.truncate(u.frac_bits) + self.c0

    def secure_derivative(self, u: AdditiveShare) -> AdditiveShare:
        """act'(u) = c1 + 2 c2 u from a share of u (local)."""
        return u.mul_public(2.0 * self.c2) + self.c1


def _positive_dims(**dims: int) -> None:
    for name, size in dims.items():
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"{name} must be a positive int, got {size!r}")


def adapter_forward(batch: int, tokens: int, dim: int, rank: int, act: Quadratic,
                    x_holder: int | None = None) -> Program:
    """y = x + act(x A) B in 3 rounds; keeps u and h for the backward pass.

    ``x_holder``: the party holding the input in the clear (the head's embeddings: the client;
    the tail's body output: the cloud), or None when it is shared (``masks.Use.holder``).
    """
    _positive_dims(batch=batch, tokens=tokens, dim=dim, rank=rank)
    x_shape, u_shape = (batch, tokens, dim), (batch, tokens, rank)

    def activation(values: Values) -> dict[str, AdditiveShare]:
        return {"h": act.secure(values["u"], values["u2"])}

    def residual(values: Values) -> dict[str, AdditiveShare]:
        return {"y": values["x"] + values["hB"]}

    return Program(
        name="adapter.forward",
        stages=(
            Stage(
                "adapter.down",
                (Product("u", TripleRequest.matmul(x_shape, (dim, rank)), Use("x", x_shape, holder=x_holder),
                         Use("A", (dim, rank))),),
            ),
            Stage("adapter.act", (Product("u2", TripleRequest.square(u_shape), Use("u", u_shape)),), activation),
            Stage(
                "adapter.up",
                (Product("hB", TripleRequest.matmul(u_shape, (rank, dim)), Use("h", u_shape), Use("B", (rank, dim))),),
                residual,
            ),
        ),
        inputs=("x", "A", "B"),
        outputs=("y",),
    )


def adapter_backward(
    batch: int, tokens: int, dim: int, rank: int, act: Quadratic, input_grad: bool = True,
    x_holder: int | None = None, gy_holder: int | None = None,
) -> Program:
    """gA, gB (and gx = dL/dx if ``input_grad``) from gy = dL/dy, in 3 rounds.

    The head adapter needs no input gradient (its input is the tenant's embedding), the
    tail adapter does (dL/dh is what the cloud backpropagates through the body).
    ``x_holder`` / ``gy_holder``: the party holding the input / the output gradient in the
    clear (the head's dL/df: the cloud, which computes it), or None when shared.
    """
    _positive_dims(batch=batch, tokens=tokens, dim=dim, rank=rank)
    x_shape, u_shape, n = (batch, tokens, dim), (batch, tokens, rank), batch * tokens

    def derivative(values: Values) -> dict[str, AdditiveShare]:
        return {"du": act.secure_derivative(values["u"])}

    def residual(values: Values) -> dict[str, AdditiveShare]:
        return {"gx": values["gy"] + values["guA"]}

    grad_in: tuple[Product, ...] = (
        Product("gA", TripleRequest.matmul((dim, n), (n, rank)), Use("x", x_shape, View.FLAT_T, x_holder),
                Use("gu", u_shape, View.FLAT)),
    )
    if input_grad:
        grad_in += (Product("guA", TripleRequest.matmul(u_shape, (rank, dim)), Use("gu", u_shape),
                             Use("A", (dim, rank), View.T)),)

    return Program(
        name="adapter.backward",
        stages=(
            Stage(
                "adapter.grad_up",
                (
                    Product(
                        "gB",
                        TripleRequest.matmul((rank, n), (n, dim)),
                        Use("h", u_shape, View.FLAT_T),
                        Use("gy", x_shape, View.FLAT, gy_holder),
                    ),
                    Product("gh", TripleRequest.matmul(x_shape, (dim, rank)), Use("gy", x_shape, holder=gy_holder),
                            Use("B", (rank, dim), View.T)),
                ),
                derivative,
            ),
            Stage("adapter.grad_act", (Product("gu", TripleRequest.mul(u_shape), Use("gh", u_shape), Use("du", u_shape)),)),
            Stage("adapter.grad_down", grad_in, residual if input_grad else None),
        ),
        inputs=("gy", "x", "A", "B", "u", "h"),
        outputs=("gA", "gB", "gx") if input_grad else ("gA", "gB"),
    )


def classifier_forward(batch: int, dim: int, classes: int) -> Program:
    """z = p Wc + bc in 1 round."""
    _positive_dims(batch=batch, dim=dim, classes=classes)

    def bias(values: Values) -> dict[str, AdditiveShare]:
        return {"z": values["pWc"] + values["bc"]}

    return Program(
        name="classifier.forward",
        stages=(
            Stage(
                "classifier.logits",
                (Product("pWc", TripleRequest.matmul((batch, dim), (dim, classes)), Use("p", (batch, dim)),
                         Use("Wc", (dim, classes))),),
                bias,
            ),
        ),
        inputs=("p", "Wc", "bc"),
        outputs=("z",),
    )


def classifier_backward(batch: int, dim: int, classes: int, input_grad: bool = True) -> Program:
    """gWc = p^T gz, gbc = sum_batch gz (and gp = gz Wc^T if ``input_grad``) in 1 round."""
    _positive_dims(batch=batch, dim=dim, classes=classes)
    products: tuple[Product, ...] = (
        Product("gWc", TripleRequest.matmul((dim, batch), (batch, classes)), Use("p", (batch, dim), View.T),
                Use("gz", (batch, classes))),
    )
    if input_grad:
        gp_request = TripleRequest.matmul((batch, classes), (classes, dim))
        products += (Product("gp", gp_request, Use("gz", (batch, classes)), Use("Wc", (dim, classes), View.T)),)

    def bias_grad(values: Values) -> dict[str, AdditiveShare]:
        return {"gbc": values["gz"].sum(0)}

    return Program(
        name="classifier.backward",
        stages=(Stage("classifier.grads", products, bias_grad),),
        inputs=("gz", "p", "Wc"),
        outputs=("gWc", "gbc", "gp") if input_grad else ("gWc", "gbc"),
    )


def _token_counts(mask: Tensor, batch: int, tokens: int | None = None) -> Tensor:
    """Unmasked tokens per sequence of a public 0/1 mask [batch, tokens]."""
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.dim() != 2:
        raise ValueError("mask must be a 2-D integer or bool tensor [batch, tokens]")
    if mask.shape[0] != batch or (tokens is not None and mask.shape[1] != tokens):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected batch {batch}, tokens {tokens}")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold only 0 and 1")
    counts = mask.to(torch.int64).sum(1)
    if bool((counts == 0).any()):
        raise ValueError("every sequence needs at least one unmasked token")
    return counts


def mean_pool(y: AdditiveShare, mask: Tensor) -> AdditiveShare:
    """Masked mean over tokens, [batch, tokens, dim] -> [batch, dim]; local, error < 1 LSB.

    The attention mask (sequence lengths) is public to both parties.
    """
    if y.dim() != 3:
        raise ValueError(f"mean_pool needs a [batch, tokens, dim] share, got {tuple(y.shape)}")
    counts = _token_counts(mask, y.shape[0], y.shape[1])
    return y.mul_public(mask.to(torch.int64).unsqueeze(-1)).sum(1).div_public(counts.unsqueeze(-1))


def mean_pool_backward(gp: AdditiveShare, mask: Tensor) -> AdditiveShare:
    """Gradient of ``mean_pool``: gy[b, t] = mask[b, t] * gp[b] / count[b]; local, error < 1 LSB."""
    if gp.dim() != 2:
        raise ValueError(f"mean_pool_backward needs a [batch, dim] share, got {tuple(gp.shape)}")
    counts = _token_counts(mask, gp.shape[0])
    weights = mask.to(torch.int64).unsqueeze(-1)
    return gp.unsqueeze(1).mul_public(weights).div_public(counts.view(-1, 1, 1))
