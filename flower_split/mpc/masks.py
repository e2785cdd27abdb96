"""Beaver masks bound to one tensor: each shared tensor is masked and opened once per scope.

A Beaver product op(x, y) opens eps = x - a and delta = y - b.  When the same shared
tensor enters several products (x in the forward x A and the backward x^T gu, h in
h B and h^T gy, gy in gy B^T and h^T gy, ...), opening it again with a fresh mask costs
another message and reveals nothing new.  Instead the dealer deals **one mask per
tensor** and a product triple (a_x, a_y, c = op(view(a_x), view(a_y))) per product: the
tensor is opened once, eps_x = x - a_x, and every product it enters reuses eps_x through
a public, linear ``View`` (transpose, token flattening) applied to both eps_x and a_x.

Invariant (docs/mpc.md, "Mask reuse"): a mask masks exactly one secret tensor.  The
same opened eps may enter any number of products; a mask must never open a second,
different tensor, since (x - a) - (x' - a) = x - x' would be public.  Enforced here:

* a ``MaskRecord`` is created by the one opening of its mask and is bound to this party's
  share of the tensor it opened: that share is exactly sent + mask share (ring arithmetic),
  so reusing the record for any other share (another tensor under the same name, or other
  fractional bits) raises ``MaskReuseError``;
* a scope (``PartyState.scope``: one module of one step) opens a name at most once
  (``Stage.begin`` only opens names it has no record of);
* a dealer hands each (scope, name) mask to each party once (``correlated``).

A record holds this party's mask share, what it sent and what it received: bounded
memory, one scope's masked tensors times three, freed with the scope (the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor

from .share import AdditiveShare
from .triples import Shape


class MaskReuseError(ValueError):
    """A mask was asked to mask a second, different tensor."""


class View(str, Enum):
    """A public linear rearrangement of a tensor, applied alike to shares, masks and openings."""

    SAME = "same"
    T = "T"  # transpose of a 2-D tensor
    FLAT = "flat"  # [batch, tokens, k] -> [batch * tokens, k]
    FLAT_T = "flat_T"  # [batch, tokens, k] -> [k, batch * tokens]


def apply_view(view: View, tensor: Tensor) -> Tensor:
    """``tensor`` rearranged by ``view`` (no copy where torch allows)."""
    if view is View.SAME:
        return tensor
    if view is View.T:
        return tensor.t()
    flat = tensor.flatten(0, 1)
    return flat if view is View.FLAT else flat.t()


def viewed_shape(view: View, shape: Shape) -> Shape:
    """The shape of a tensor of ``shape`` after ``view``."""
    if view is View.SAME:
        return shape
    if view is View.T:
        if len(shape) != 2:
            raise ValueError(f"view T needs a 2-D shape, got {shape}")
        return (shape[1], shape[0])
    if len(shape) != 3:
        raise ValueError(f"view {view.value} needs a [batch, tokens, k] shape, got {shape}")
    return (shape[0] * shape[1], shape[2]) if view is View.FLAT else (shape[2], shape[0] * shape[1])


def mask_share(holder: int | None, party: int, shape: Shape, draw: Callable[[], Tensor]) -> Tensor:
    """``party``'s share of the mask of a value ``holder`` holds (None: a shared value).

    The one rule every source of masks follows: a held value's mask is its holder's alone, so
    the other party's share is 0 and ``draw`` (the holder's share, from whatever randomness the
    source has) is called only for a party that opens the value (``Use.sent_by``).
    """
    if holder is not None and holder != party:
        return torch.zeros(tuple(shape), dtype=torch.int64)
    return draw()


@dataclass(frozen=True)
class Use:
    """A product operand: the named value of ``shape`` (also its mask's shape), seen through ``view``.

    ``holder``: the party that holds the value in the clear (its share is the value, the
    other party's share is 0), or None for a value shared between both. A held value's mask
    is dealt to its holder alone, only the holder opens it, and a product with one held
    operand costs each party one matmul instead of two (``beaver``, "Held operands").
    """

    name: str
    shape: Shape
    view: View = View.SAME
    holder: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a use needs a non-empty value name, got {self.name!r}")
        if self.holder is not None and (isinstance(self.holder, bool) or self.holder not in (0, 1)):
            raise ValueError(f"a use's holder must be 0, 1 or None, got {self.holder!r}")
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "view", View(self.view))
        viewed_shape(self.view, self.shape)

    def sent_by(self, party: int) -> bool:
        """Whether ``party`` opens this value (both do for a shared value, only the holder for a held one)."""
        return self.holder is None or self.holder == party

    @property
    def viewed(self) -> Shape:
        return viewed_shape(self.view, self.shape)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    def of(self, share: AdditiveShare) -> AdditiveShare:
        """This operand from the named value's share."""
        return AdditiveShare(apply_view(self.view, share.data), share.party, share.frac_bits)


@dataclass(frozen=True)
class MaskRecord:
    """One party's state of one mask: its share, the tensor it is bound to, the opening.

    Attributes:
        shape: the mask's (and the masked tensor's) shape.
        share: this party's share a_i of the mask.
        frac_bits: the fractional bits of the one tensor the mask opened.
        sent: this party's part of the opening, x_i - a_i (so x_i = sent + share binds the
            record to that tensor without keeping it, or a digest of it, around). The record
            holds ``share`` and ``sent`` by reference: nothing may change them in place (no
            code does; the binding would follow such a change).
        received: the peer's part, once delivered (then eps = sent + received).
    """

    shape: Shape
    share: Tensor
    frac_bits: int
    sent: Tensor
    received: Tensor | None = None

    @classmethod
    def open(cls, value: AdditiveShare, mask_share: Tensor) -> MaskRecord:
        """The one opening of a fresh mask, bound to ``value`` (this party's share)."""
        if tuple(mask_share.shape) != tuple(value.shape) or mask_share.dtype != torch.int64:
            raise ValueError(f"mask share of shape {tuple(mask_share.shape)} cannot mask a value of shape "
                             f"{tuple(value.shape)}")
        return cls(tuple(value.shape), mask_share, value.frac_bits, value.data - mask_share)

    def check_bound(self, name: str, value: AdditiveShare) -> None:
        """Raise ``MaskReuseError`` unless ``value`` is the share this mask opened (x_i = sent + a_i)."""
        if (tuple(value.shape) != self.shape or value.frac_bits != self.frac_bits
                or not torch.equal(value.data, self.sent + self.share)):
            raise MaskReuseError(f"the mask of {name!r} already opened another tensor; a mask masks one "
                                 "tensor only (open the new value under a new name)")

    def completed(self, received: Tensor) -> MaskRecord:
        """This record with the peer's part of the opening (checked)."""
        if self.received is not None:
            raise ValueError("this mask's opening was already completed")
        if not isinstance(received, Tensor) or received.dtype != torch.int64:
            raise TypeError("an opening must be an int64 tensor")
        if tuple(received.shape) != self.shape:
            raise ValueError(f"opening has shape {tuple(received.shape)}, expected {self.shape}")
        return replace(self, received=received)

    def peer_part(self, view: View) -> Tensor:
        """The peer's part of the opening seen through ``view`` (``PendingProduct.finish`` adds its own)."""
        if self.received is None:
            raise ValueError("this mask's opening has not been received")
        return apply_view(view, self.received)
