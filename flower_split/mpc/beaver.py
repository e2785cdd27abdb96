"""Beaver products of shared values, split into a local ``begin`` and a local ``finish``.

Every product of two shared values needs one exchange: each party sends its masked
differences and receives the other party's.  Because a round trip between the cloud
and a client is slow (~100 ms in simulation, seconds in deployment), the exchange is
not done here: ``begin_*`` returns this party's ``Opening`` (tensors to send) and a
``PendingProduct``; after the protocol layer has delivered the peer's opening (possibly
folded into one message with many others), ``PendingProduct.finish`` completes the
product.  Both steps are purely local.

For z = op(x, y) with triple (a, b, c = op(a, b)):

    begin:   eps_i = x_i - a_i,  delta_i = y_i - b_i          (sent to the peer)
    open:    eps = eps_0 + eps_1 = x - a,  delta = y - b       (public to both)
    finish:  z_i = c_i + op(x_i, delta) + op(eps, b_i)

which sums to op(a, b) + op(x, delta) + op(eps, b) = op(x, y) by bilinearity; the
formula is the same for both parties.  For matmul the two terms are one ring matmul,
[x_i | eps] @ [delta ; b_i].  A square uses a pair (a, c = a^2) and opens only eps:
z_i = c_i + eps * (x_i + a_i), which sums to a^2 + eps (eps + 2a) = x^2.

Opened values are masked by fresh uniform a and b, so they reveal nothing about x, y.
The product in the ring is exact; ``finish`` then truncates the extra fractional bits
(see ``AdditiveShare.truncate``): error < 1 LSB, failure probability
<= (|z| 2^(2f) + 2) / 2^64 per output element, where z is the real-valued product
(for a matmul, the whole dot product: intermediate sums may wrap harmlessly).

Cost per product and per party: one message of ``request.opened_elements`` int64
elements (8 bytes each) in each direction, one round.

Held operands.  When one operand is held in the clear by one party H (the other party N's
share of it is 0, and so is N's share of its mask: ``masks.Use.holder``), only H opens it,
and the product needs one matmul per party instead of two, with the dealer's c adjusted:

    x held by H (left):   z_H = c_H + op(x, delta + b_H),   z_N = c_N + op(eps, b_N),   c = op(a, b_N)
    y held by H (right):  z_H = c_H + op(eps + a_H, y),     z_N = c_N + op(a_N, delta), c = op(a_N, b)

(sums: x (y - b_N) + (x - a) b_N + a b_N = x y, and (x - a_N) y + a_N (y - b) + a_N b = x y).
What each party receives is what it received before (masked by the other party's or the
dealer's uniform values); only the zero opening of a value the sender does not hold is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .limbs import ring_matmul
from .share import AdditiveShare
from .triples import BeaverMaterial, Op, SquarePair, Triple, TripleRequest

Opening = tuple[Tensor, ...]
"""What one party sends for one product: (eps_i, delta_i), or (eps_i,) for a square."""

SHARED, LEFT, RIGHT = "shared", "left", "right"


def held_form(op: Op, x_holder: int | None, y_holder: int | None) -> tuple[str, int | None]:
    """How a product finishes, given its operands' holders: (SHARED, None), (LEFT, H) or (RIGHT, H).

    A square of a held value and a product of shared values finish alike (Beaver's formula
    holds for any split of the masks); a product of two values one party holds is that
    party's own work, not a 2PC product.
    """
    if op is Op.SQUARE or (x_holder is None and y_holder is None):
        return SHARED, None
    if x_holder is not None and x_holder == y_holder:
        raise ValueError(f"both operands are held by party {x_holder}: it computes the product alone")
    return (LEFT, x_holder) if x_holder is not None else (RIGHT, y_holder)


@dataclass(frozen=True)
class PendingProduct:
    """One party's state for a Beaver product between ``begin`` and ``finish``.

    Plain tensors and ints only, so a protocol layer can persist it between messages.

    Attributes:
        request: the product.
        party: this party.
        out_frac_bits: fractional bits of the result after truncation.
        truncate_bits: fractional bits ``finish`` drops.
        x: this party's share of the left operand.
        sent: this party's opening (eps_i[, delta_i]).
        material: this party's triple or square pair.
        y: this party's share of the right operand (held products finish with it).
        form: SHARED, LEFT or RIGHT (``held_form``), and ``holder`` the party holding the
            held operand.
    """

    request: TripleRequest
    party: int
    out_frac_bits: int
    truncate_bits: int
    x: Tensor
    sent: Opening
    material: BeaverMaterial
    y: Tensor | None = None
    form: str = SHARED
    holder: int | None = None

    def finish(self, received: Sequence[Tensor]) -> AdditiveShare:
        """This party's share of the product, given the peer's opening for it.

        Raises:
            ValueError / TypeError: ``received`` does not match what this party sent
            (count, dtype or shapes).
        """
        if not isinstance(received, (tuple, list)) or len(received) != len(self.sent):
            got = f"{len(received)} tensor(s)" if isinstance(received, (tuple, list)) else type(received).__name__
            raise ValueError(f"{self.request.op.value} expects an opening of {len(self.sent)} tensor(s), got {got}")
        for index, (mine, theirs) in enumerate(zip(self.sent, received)):
            if not isinstance(theirs, Tensor) or theirs.dtype != torch.int64:
                raise TypeError(f"opening tensor {index} must be an int64 tensor")
            if theirs.shape != mine.shape:
                raise ValueError(
                    f"opening tensor {index} of {self.request.op.value} has shape {tuple(theirs.shape)}, "
                    f"expected {tuple(mine.shape)}"
                )
        eps = self.sent[0] + received[0]
        material = self.material
        if isinstance(material, SquarePair):
            z = material.c + eps * (self.x + material.a)
        else:
            delta = self.sent[1] + received[1]
            op = torch.mul if self.request.op is Op.MUL else ring_matmul
            if self.form == LEFT:
                z = material.c + (op(self.x, delta + material.b) if self.party == self.holder else op(eps, material.b))
            elif self.form == RIGHT:
                assert self.y is not None
                z = material.c + (op(eps + material.a, self.y) if self.party == self.holder else op(material.a, delta))
            elif self.request.op is Op.MUL:
                z = material.c + self.x * delta + eps * material.b
            else:
                z = material.c + ring_matmul(torch.cat([self.x, eps], dim=-1), torch.cat([delta, material.b], dim=0))
        product = AdditiveShare(z, self.party, self.out_frac_bits + self.truncate_bits)
        return product.truncate(self.truncate_bits)


def begin(
    request: TripleRequest, x: AdditiveShare, y: AdditiveShare | None, material: BeaverMaterial,
    x_holder: int | None = None, y_holder: int | None = None, opened: Opening | None = None,
) -> tuple[PendingProduct, Opening]:
    """Start the product ``request`` of shares x (and y): returns (pending state, opening to send).

    The result will carry max(x.frac_bits, y.frac_bits) fractional bits (the exact
    product carries their sum; the smaller is truncated away). ``x_holder`` / ``y_holder``:
    the party holding that operand in the clear (module docstring, "Held operands"); the
    material must then be dealt for the held form (``correlated.product_c``).
    """
    if not isinstance(request, TripleRequest):
        raise TypeError(f"request must be a TripleRequest, got {type(request).__name__}")
    operands = (x,) if request.op is Op.SQUARE else (x, y)
    for name, operand in zip("xy", operands):
        if not isinstance(operand, AdditiveShare):
            raise TypeError(f"{request.op.value} operand {name} must be an AdditiveShare, got {type(operand).__name__}")
    if request.op is Op.SQUARE and y is not None:
        raise ValueError("square takes one operand")
    if y is not None and y.party != x.party:
        raise ValueError(f"operands belong to different parties ({x.party} and {y.party})")
    shapes = (request.x_shape,) if y is None else (request.x_shape, request.y_shape)
    for name, operand, shape in zip("xy", operands, shapes):
        if tuple(operand.shape) != shape:
            raise ValueError(
                f"{request.op.value} operand {name} has shape {tuple(operand.shape)}, request says {shape}"
            )
    if not isinstance(material, (Triple, SquarePair)):
        raise TypeError(f"material must be a Triple or SquarePair, got {type(material).__name__}")
    material.check(request)

    form, holder = held_form(request.op, x_holder, y_holder)
    held = x if form == LEFT else y
    if holder is not None and x.party != holder and held is not None and bool(held.data.any()):
        raise ValueError(f"party {holder} holds operand {'x' if form == LEFT else 'y'} in the clear, so party "
                         f"{x.party}'s share of it must be 0")
    y_frac = x.frac_bits if y is None else y.frac_bits
    sent = _opening(request, x, y, material, opened)
    pending = PendingProduct(
        request=request,
        party=x.party,
        out_frac_bits=max(x.frac_bits, y_frac),
        truncate_bits=min(x.frac_bits, y_frac),
        x=x.data,
        sent=sent,
        material=material,
        y=None if y is None else y.data,
        form=form,
        holder=holder,
    )
    return pending, sent


def _opening(request: TripleRequest, x: AdditiveShare, y: AdditiveShare | None, material: BeaverMaterial,
             opened: Opening | None) -> Opening:
    """x - a (and y - b for a triple): ``opened`` when given (checked int64 and shaped), else computed."""
    masked = [(x, material.a)] + ([(y, material.b)] if isinstance(material, Triple) and y is not None else [])
    if opened is None:
        return tuple(value.data - mask for value, mask in masked)
    sent = tuple(opened)
    expected = [tuple(value.shape) for value, _ in masked]
    if any(not isinstance(t, Tensor) or t.dtype != torch.int64 for t in sent):
        raise TypeError(f"{request.op.value}: the given opening must be int64 tensors")
    if [tuple(t.shape) for t in sent] != expected:
        raise ValueError(f"{request.op.value}: the given opening has shapes {[tuple(t.shape) for t in sent]}, "
                         f"expected {expected}")
    return sent


def begin_mul(x: AdditiveShare, y: AdditiveShare, triple: Triple) -> tuple[PendingProduct, Opening]:
    """Start the element-wise product x * y (equal shapes)."""
    return begin(TripleRequest.mul(tuple(x.shape)), x, y, triple)


def begin_matmul(x: AdditiveShare, y: AdditiveShare, triple: Triple) -> tuple[PendingProduct, Opening]:
    """Start x [..., k] @ y [k, n].  For x^T @ g or g @ W^T pass transposed shares."""
    return begin(TripleRequest.matmul(tuple(x.shape), tuple(y.shape)), x, y, triple)


def begin_square(x: AdditiveShare, pair: SquarePair) -> tuple[PendingProduct, Opening]:
    """Start the element-wise square x * x (one opened tensor instead of two)."""
    return begin(TripleRequest.square(tuple(x.shape)), x, None, pair)
