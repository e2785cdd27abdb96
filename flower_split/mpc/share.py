"""Additive secret shares over Z_2^64 and the local (communication-free) operations on them.

A secret ring tensor s is split as s = s_0 + s_1 (mod 2^64) with s_0 uniform, so each
share alone is uniform and independent of s.  Party 0 is the cloud, party 1 the
client.  ``AdditiveShare`` is one party's share: its int64 tensor, its party index
and the number of fractional bits of the fixed-point encoding it carries.

Everything here is local.  Products of two shared values need a Beaver triple and
one exchange of openings; they live in ``beaver``.

Public operands are real values (Python numbers or tensors): they are encoded at the
share's fractional bits and added by party 0 only.  Integer public factors multiply
exactly; floating ones are encoded and the product truncated.

Error bounds (LSB = 2^-f, f = frac bits):

* add / sub / neg / add public / multiply by public integer: exact in the ring
  (a public real operand carries its own encoding error <= LSB/2);
* ``truncate`` / ``div_public``: |error| < 1 LSB of the result, except with
  probability <= (|x| + 2) / 2^64 per element, where |x| is the signed ring integer
  being divided (see ``truncate``);
* ``mul_public`` with a real factor p: |p| * LSB/2 from encoding p, plus < 1 LSB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .randomness import random_ring
from .ring import DEFAULT_FRAC_BITS, check_frac_bits, check_ring_tensor, decode, encode

PublicValue = Tensor | float | int
"""A value known to both parties (never secret)."""


def _check_party(party: object) -> int:
    if isinstance(party, bool) or not isinstance(party, int):
        raise TypeError(f"party must be the int 0 (cloud) or 1 (client), got {type(party).__name__}")
    if party not in (0, 1):
        raise ValueError(f"party must be 0 (cloud) or 1 (client), got {party}")
    return party


def _is_integer_public(value: PublicValue) -> bool:
    if isinstance(value, Tensor):
        return not value.is_floating_point() and not value.is_complex()
    return isinstance(value, int)


class AdditiveShare:
    """One party's additive share of a fixed-point tensor in Z_2^64.

    Attributes:
        data: int64 tensor, this party's share.
        party: 0 (cloud) or 1 (client).
        frac_bits: fractional bits of the encoding the shared value carries.
    """

    __slots__ = ("data", "party", "frac_bits")

    def __init__(self, data: Tensor, party: int, frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        self.data = check_ring_tensor(data, "share data")
        self.party = _check_party(party)
        self.frac_bits = check_frac_bits(frac_bits)

    def __repr__(self) -> str:
        return f"AdditiveShare(party={self.party}, frac_bits={self.frac_bits}, shape={tuple(self.data.shape)})"

    # ----------------------------------------------------------------- shape
    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dim(self) -> int:
        return self.data.dim()

    def _like(self, data: Tensor, frac_bits: int | None = None) -> AdditiveShare:
        return AdditiveShare(data, self.party, self.frac_bits if frac_bits is None else frac_bits)

    def reshape(self, *shape: int) -> AdditiveShare:
        return self._like(self.data.reshape(*shape))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> AdditiveShare:
        return self._like(self.data.flatten(start_dim, end_dim))

    def transpose(self, dim0: int, dim1: int) -> AdditiveShare:
        return self._like(self.data.transpose(dim0, dim1))

    @property
    def T(self) -> AdditiveShare:  # noqa: N802 - mirrors torch.Tensor.T
        """Transpose of a 2-D share."""
        if self.data.dim() != 2:
            raise ValueError(f".T needs a 2-D share, got shape {tuple(self.shape)}")
        return self._like(self.data.t())

    def unsqueeze(self, dim: int) -> AdditiveShare:
        return self._like(self.data.unsqueeze(dim))

    def sum(self, dim: int | Sequence[int], keepdim: bool = False) -> AdditiveShare:
        """Sum over ``dim``: local and exact (shares of a sum are sums of shares)."""
        return self._like(self.data.sum(dim=dim, keepdim=keepdim))

    def __getitem__(self, index: object) -> AdditiveShare:
        return self._like(self.data[index])

    # ------------------------------------------------------------ arithmetic
    def _check_peer(self, other: AdditiveShare, op: str) -> None:
        if other.party != self.party:
            raise ValueError(
                f"cannot {op} shares of party {self.party} and party {other.party}; "
                "to combine both parties' shares use reconstruct()"
            )
        if other.frac_bits != self.frac_bits:
            raise ValueError(
                f"cannot {op} shares with {self.frac_bits} and {other.frac_bits} fractional bits; "
                "truncate() one of them first"
            )
        try:
            torch.broadcast_shapes(self.shape, other.shape)
        except RuntimeError:
            raise ValueError(f"cannot {op} shares of shapes {tuple(self.shape)} and {tuple(other.shape)}") from None

    def _add_public(self, value: PublicValue, sign: int, op: str) -> AdditiveShare:
        """Add sign * value (public, real): party 0 adds its encoding, party 1 only broadcasts."""
        if isinstance(value, AdditiveShare) or not isinstance(value, (Tensor, int, float)):
            raise TypeError(f"cannot {op} an AdditiveShare and {type(value).__name__}")
        public = encode(value, self.frac_bits)
        try:
            shape = torch.broadcast_shapes(self.shape, public.shape)
        except RuntimeError:
            raise ValueError(
                f"cannot {op} a share of shape {tuple(self.shape)} and a public value of shape {tuple(public.shape)}"
            ) from None
        if self.party == 0:
            return self._like(self.data + public if sign > 0 else self.data - public)
        return self._like(self.data if shape == self.shape else self.data.expand(shape).contiguous())

    def __add__(self, other: AdditiveShare | PublicValue) -> AdditiveShare:
        if isinstance(other, AdditiveShare):
            self._check_peer(other, "add")
            return self._like(self.data + other.data)
        return self._add_public(other, +1, "add")

    __radd__ = __add__

    def __neg__(self) -> AdditiveShare:
        return self._like(-self.data)

    def __sub__(self, other: AdditiveShare | PublicValue) -> AdditiveShare:
        if isinstance(other, AdditiveShare):
            self._check_peer(other, "subtract")
            return self._like(self.data - other.data)
        return self._add_public(other, -1, "subtract")

    def __rsub__(self, other: PublicValue) -> AdditiveShare:
        return (-self) + other

    def __mul__(self, other: PublicValue) -> AdditiveShare:
        """Multiply by a public value; share x share needs a Beaver triple (see ``beaver``)."""
        if isinstance(other, AdditiveShare):
            raise TypeError("share * share needs a Beaver triple: use beaver.begin_mul / finish")
        return self.mul_public(other)

    __rmul__ = __mul__

    def mul_public(self, value: PublicValue, truncate: bool = True) -> AdditiveShare:
        """Multiply by a public value.

        Integer (or bool) values multiply the ring tensor exactly and keep ``frac_bits``.
        Real values are encoded with ``frac_bits`` fractional bits; the product carries
        2 * frac_bits and is truncated back unless ``truncate`` is False (useful to add
        several products and truncate once).  A share with 0 fractional bits (an
        integer) only accepts integer factors.
        """
        if isinstance(value, AdditiveShare) or not isinstance(value, (Tensor, int, float)):
            raise TypeError(f"cannot multiply an AdditiveShare by {type(value).__name__}")
        if _is_integer_public(value):
            factor = torch.as_tensor(value).to(torch.int64)
            return self._like(self.data * factor)
        if self.frac_bits == 0:
            raise ValueError(
                "a share with 0 fractional bits cannot be scaled by a real value; encode it with fractional bits"
            )
        product = self._like(self.data * encode(value, self.frac_bits), 2 * self.frac_bits)
        return product.truncate(self.frac_bits) if truncate else product

    def _divide_locally(self, divisor: int | Tensor) -> Tensor:
        """SecureML local division: party 0 floors x_0 / d, party 1 computes -floor(-x_1 / d)."""
        if self.party == 0:
            return torch.div(self.data, divisor, rounding_mode="floor")
        return -torch.div(-self.data, divisor, rounding_mode="floor")

    def truncate(self, bits: int) -> AdditiveShare:
        """Divide the shared value by 2^bits locally, dropping ``bits`` fractional bits.

        Two-party local truncation (Mohassel & Zhang, SecureML, 2017): each party divides
        its own share, with opposite rounding directions.  If the shared signed ring
        integer x = x_0 + x_1 does not wrap as an integer sum of the signed shares, the
        result is floor(x / 2^bits) or that plus one: error < 1 LSB of the result.
        Since x_0 is uniform, the wrap happens with probability <= (|x| + 2) / 2^64; it
        then produces an error of about 2^(64 - bits) in the ring, i.e. garbage.  For a
        product of two f-bit values v (x = v * 2^(2f)) that is |v| * 2^(2f - 64) per
        element: with f = 16, 2^-32 * |v|.
        """
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= self.frac_bits:
            raise ValueError(f"truncate bits must be an int in [0, {self.frac_bits}], got {bits!r}")
        if bits == 0:
            return self
        # floor(x / 2^bits) is the arithmetic right shift: _divide_locally(1 << bits) bit for bit,
        # without an integer division per element.
        if self.party == 0:
            data = torch.bitwise_right_shift(self.data, bits)
        else:
            data = torch.bitwise_right_shift(self.data.neg(), bits).neg_()
        return self._like(data, self.frac_bits - bits)

    def div_public(self, divisor: int | Tensor) -> AdditiveShare:
        """Divide by a public positive integer (or integer tensor, broadcast) locally.

        Same protocol, error (< 1 LSB) and failure probability as ``truncate``; the
        fractional bits are unchanged.  Used e.g. for mean pooling over tokens.
        """
        if not _is_integer_public(divisor) or isinstance(divisor, bool):
            raise TypeError(f"divisor must be a public int or integer tensor, got {type(divisor).__name__}")
        if isinstance(divisor, Tensor):
            if divisor.dtype == torch.bool or bool((divisor <= 0).any()):
                raise ValueError("divisor tensor must hold positive integers")
            divisor = divisor.to(torch.int64)
        elif divisor <= 0:
            raise ValueError(f"divisor must be positive, got {divisor}")
        return self._like(self._divide_locally(divisor))


def share_ring(secret: Tensor, frac_bits: int = DEFAULT_FRAC_BITS) -> tuple[AdditiveShare, AdditiveShare]:
    """Split an already encoded int64 ring tensor into (party 0 share, party 1 share).

    The mask comes from OS entropy, so each share alone is uniform over Z_2^64.
    """
    check_ring_tensor(secret, "secret")
    mask = random_ring(secret.shape)
    return AdditiveShare(mask, 0, frac_bits), AdditiveShare(secret - mask, 1, frac_bits)


def share(secret: Tensor | float, frac_bits: int = DEFAULT_FRAC_BITS) -> tuple[AdditiveShare, AdditiveShare]:
    """Encode real values at ``frac_bits`` and split them into (party 0 share, party 1 share)."""
    return share_ring(encode(secret, frac_bits), frac_bits)


def _check_pair(share0: AdditiveShare, share1: AdditiveShare) -> None:
    for expected, item in ((0, share0), (1, share1)):
        if not isinstance(item, AdditiveShare):
            raise TypeError(f"reconstruct needs AdditiveShare arguments, got {type(item).__name__}")
        if item.party != expected:
            raise ValueError(f"reconstruct(share0, share1): argument {expected} belongs to party {item.party}")
    if share0.frac_bits != share1.frac_bits:
        raise ValueError(f"shares carry different fractional bits: {share0.frac_bits} and {share1.frac_bits}")
    if share0.shape != share1.shape:
        raise ValueError(f"shares have different shapes: {tuple(share0.shape)} and {tuple(share1.shape)}")


def reconstruct_ring(share0: AdditiveShare, share1: AdditiveShare) -> Tensor:
    """The shared int64 ring tensor share0 + share1 (mod 2^64)."""
    _check_pair(share0, share1)
    return share0.data + share1.data


def reconstruct(share0: AdditiveShare, share1: AdditiveShare) -> Tensor:
    """The shared real values as float64 (decoded at the shares' fractional bits)."""
    return decode(reconstruct_ring(share0, share1), share0.frac_bits)


__all__ = [
    "AdditiveShare",
    "PublicValue",
    "reconstruct",
    "reconstruct_ring",
    "share",
    "share_ring",
]
