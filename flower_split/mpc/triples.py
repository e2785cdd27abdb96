"""Beaver material: what a product needs (a request) and what a party holds (a triple).

A Beaver triple for a bilinear ring operation op is (a, b, c = op(a, b)) with a and b
uniform, additively shared between the parties.  Three operations are used:

* ``Op.MUL``    element-wise product, x and y of the same shape;
* ``Op.MATMUL`` x [..., k] @ y [k, n] (leading dimensions of x are batch dimensions).
  The transposed forms of backward passes (x^T @ g summed over batch and tokens,
  g @ W^T) are ordinary matmuls of locally transposed shares, so they need no
  operation of their own: only the shapes of the request differ;
* ``Op.SQUARE`` x * x, which needs only a "square pair" (a, c = a * a) and opens one
  tensor instead of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from torch import Tensor

from .limbs import ring_matmul
from .ring import check_ring_tensor

Shape = tuple[int, ...]


class Op(str, Enum):
    """The bilinear ring operations a Beaver triple can serve."""

    MUL = "mul"
    MATMUL = "matmul"
    SQUARE = "square"


def _as_shape(shape: object, what: str) -> Shape:
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a sequence of ints, got {type(shape).__name__}") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"{what} must hold non-negative ints, got {dims}")
    return dims


@dataclass(frozen=True)
class TripleRequest:
    """The kind and operand shapes of one Beaver product; the dealer serves requests in order.

    Attributes:
        op: the operation.
        x_shape: shape of the left operand (and of the triple's ``a``).
        y_shape: shape of the right operand (``b``); None for ``Op.SQUARE``.
    """

    op: Op
    x_shape: Shape
    y_shape: Shape | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))
        object.__setattr__(self, "x_shape", _as_shape(self.x_shape, "x_shape"))
        if self.op is Op.SQUARE:
            if self.y_shape is not None:
                raise ValueError("a square request has no y_shape")
            return
        if self.y_shape is None:
            raise ValueError(f"a {self.op.value} request needs y_shape")
        object.__setattr__(self, "y_shape", _as_shape(self.y_shape, "y_shape"))
        if self.op is Op.MUL and self.x_shape != self.y_shape:
            raise ValueError(f"mul operands must have equal shapes, got {self.x_shape} and {self.y_shape}")
        if self.op is Op.MATMUL and (
            len(self.x_shape) < 2 or len(self.y_shape) != 2 or self.x_shape[-1] != self.y_shape[0]
        ):
            raise ValueError(f"matmul needs x [..., k] and y [k, n], got {self.x_shape} and {self.y_shape}")

    @classmethod
    def mul(cls, shape: Shape) -> TripleRequest:
        return cls(Op.MUL, shape, shape)

    @classmethod
    def matmul(cls, x_shape: Shape, y_shape: Shape) -> TripleRequest:
        return cls(Op.MATMUL, x_shape, y_shape)

    @classmethod
    def square(cls, shape: Shape) -> TripleRequest:
        return cls(Op.SQUARE, shape)

    @property
    def out_shape(self) -> Shape:
        """Shape of the product (and of the triple's ``c``)."""
        if self.op is Op.MATMUL:
            assert self.y_shape is not None
            return (*self.x_shape[:-1], self.y_shape[1])
        return self.x_shape

    @property
    def opened_elements(self) -> int:
        """Ring elements each party sends to the other to open eps (and delta)."""
        return math.prod(self.x_shape) + (math.prod(self.y_shape) if self.y_shape is not None else 0)

    def evaluate(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """op(x, y) in the ring (exact; matmul through float64 limbs)."""
        if self.op is Op.MUL:
            assert y is not None
            return x * y
        if self.op is Op.MATMUL:
            assert y is not None
            return ring_matmul(x, y)
        return x * x


@dataclass(frozen=True)
class Triple:
    """One party's shares of a triple (a, b, c = op(a, b)) for an element-wise or matrix product."""

    a: Tensor
    b: Tensor
    c: Tensor

    def check(self, request: TripleRequest) -> None:
        """Raise ValueError unless the tensors are int64 with the shapes ``request`` implies."""
        if request.op is Op.SQUARE:
            raise ValueError("a square request is served by a SquarePair, not a Triple")
        for name, tensor, shape in (
            ("a", self.a, request.x_shape),
            ("b", self.b, request.y_shape),
            ("c", self.c, request.out_shape),
        ):
            check_ring_tensor(tensor, f"triple.{name}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"triple.{name} has shape {tuple(tensor.shape)}, {request.op.value} needs {shape}")


@dataclass(frozen=True)
class SquarePair:
    """One party's shares of a square pair (a, c = a * a)."""

    a: Tensor
    c: Tensor

    def check(self, request: TripleRequest) -> None:
        """Raise ValueError unless this serves ``request`` (a square of ``request.x_shape``)."""
        if request.op is not Op.SQUARE:
            raise ValueError(f"a {request.op.value} request is served by a Triple, not a SquarePair")
        for name, tensor in (("a", self.a), ("c", self.c)):
            check_ring_tensor(tensor, f"square_pair.{name}")
            if tuple(tensor.shape) != request.x_shape:
                raise ValueError(f"square_pair.{name} has shape {tuple(tensor.shape)}, needs {request.x_shape}")


BeaverMaterial = Triple | SquarePair
"""One party's Beaver material for one product, ready to use."""
