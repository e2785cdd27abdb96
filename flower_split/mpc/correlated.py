"""Correlated Beaver material for staged programs: one mask per tensor, one c per product.

The dealer deals, per scope (one module of one step), a uniform mask a_v for every shared
value v that enters a product (``masks``), and for every product op(view_x(x), view_y(y))
shares of c = op(view_x(a_x), view_y(a_y)).  A party's material for a product is then
(view_x(a_x,i), view_y(a_y,i), c_i): an ordinary Beaver triple whose a and b are views of
masks that other products of the same scope share.  Correctness is Beaver's identity,
which holds for any a, b with c = op(a, b); security needs each mask to mask one tensor
only (see ``masks``) and every c share to be uniform on its own (a fresh pad per product).

Two sources serve a party's ``Stage.begin``:

* ``OnlineMaskDealer`` (in process: tests, benchmarks, ``LocalTwoParty``) draws masks from
  OS entropy, remembers them per (scope, name), and deals c shares on demand;
* the protocol derives masks and c pads from per-party seeds (``SeededProduct``,
  ``deal_product``), as the secure dealer does (``protocol.secure_dealer``).

Delivery of c mirrors ``dealer``: each party expands a 32-byte seed into a pad t_i of c's
shape; the uncorrected party's c_i is t_i, the correction party receives
masked_c = c - t_uncorrected + t_correction and takes c_i = masked_c - t_i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from .beaver import LEFT, RIGHT, held_form
from .dealer import check_delivery
from .masks import MaskReuseError, Use, apply_view, mask_share
from .randomness import RingStream, random_ring
from .triples import Op, Shape, TripleRequest


def product_c(request: TripleRequest, x: Use, y: Use | None, masks: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
    """c from both parties' mask shares (party 0's, party 1's), by value name.

    c = op(view_x(a_x), view_y(a_y)) for shared operands; with a held operand (``Use.holder``,
    ``beaver.held_form``) the other operand's mask enters through the non-holder's share
    alone: c = op(a_x, b_N) when x is held, op(a_N, b_y) when y is.
    """
    form, holder = held_form(request.op, x.holder, None if y is None else y.holder)
    shares = masks[x.name]
    a = apply_view(x.view, shares[1 - holder] if form == RIGHT else shares[0] + shares[1])
    if request.op is Op.SQUARE:
        return request.evaluate(a)
    assert y is not None
    shares = masks[y.name]
    b = apply_view(y.view, shares[1 - holder] if form == LEFT else shares[0] + shares[1])
    return request.evaluate(a, b)


class MaskSource(ABC):
    """Where one party's ``Stage.begin`` gets its mask shares and product c shares."""

    party: int

    @abstractmethod
    def mask(self, scope: str, name: str, shape: Shape, holder: int | None = None) -> Tensor:
        """This party's share of the mask of value ``name`` in ``scope`` (dealt once per party);
        of a value ``holder`` holds: the whole mask for the holder, 0 for the other party."""

    @abstractmethod
    def product(self, scope: str, request: TripleRequest, x: Use, y: Use | None) -> Tensor:
        """This party's share of c for the next product of ``scope`` (served in program order)."""


@dataclass(frozen=True)
class SeededProduct:
    """One party's c share for one product, as delivered: a seed and maybe a correction."""

    request: TripleRequest
    party: int
    seed: bytes
    masked_c: Tensor | None = None

    def __post_init__(self) -> None:
        check_delivery(self.request, self.party, self.seed, self.masked_c)

    def expand(self) -> Tensor:
        """This party's share c_i."""
        pad = RingStream(self.seed).next(self.request.out_shape)
        return pad if self.masked_c is None else self.masked_c - pad


def deal_product(request: TripleRequest, c: Tensor, seed0: bytes, seed1: bytes,
                 correction_party: int = 1) -> tuple[SeededProduct, SeededProduct]:
    """Both parties' c material (party 0's, party 1's) for ``request`` from fresh per-party seeds."""
    if correction_party not in (0, 1) or isinstance(correction_party, bool):
        raise ValueError(f"correction_party must be 0 or 1, got {correction_party!r}")
    seeds = (seed0, seed1)
    fixed = 1 - correction_party
    pads = [RingStream(seed).next(request.out_shape) for seed in seeds]
    materials = {fixed: SeededProduct(request, fixed, seeds[fixed]),
                 correction_party: SeededProduct(request, correction_party, seeds[correction_party],
                                                 c - pads[fixed] + pads[correction_party])}
    return materials[0], materials[1]


class OnlineMaskDealer:
    """An in-process dealer of masks and c shares for both parties, on demand.

    It keeps every mask it dealt (per scope and name) for the c of later products: memory
    grows with the scopes served; use one per run.
    """

    def __init__(self) -> None:
        self._masks: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._drawn: set[tuple[int, str, str]] = set()
        self._pending: tuple[deque, deque] = (deque(), deque())

    def sources(self) -> tuple[MaskSource, MaskSource]:
        """(party 0's source, party 1's source)."""
        return _OnlineSource(self, 0), _OnlineSource(self, 1)

    def mask(self, party: int, scope: str, name: str, shape: Shape, holder: int | None = None) -> Tensor:
        key = (scope, name)
        if (party, *key) in self._drawn:
            raise MaskReuseError(f"the mask of {name!r} in scope {scope!r} was already dealt to party {party}")
        if key not in self._masks:
            self._masks[key] = (mask_share(holder, 0, shape, lambda: random_ring(shape)),
                                mask_share(holder, 1, shape, lambda: random_ring(shape)))
        elif tuple(self._masks[key][0].shape) != tuple(shape):
            raise ValueError(f"the mask of {name!r} in scope {scope!r} has shape "
                             f"{tuple(self._masks[key][0].shape)}, asked for {tuple(shape)}")
        self._drawn.add((party, *key))
        return self._masks[key][party]

    def product(self, party: int, scope: str, request: TripleRequest, x: Use, y: Use | None) -> Tensor:
        key = (scope, request, x, y)
        if not self._pending[party]:
            uses = (x,) if y is None else (x, y)
            missing = [use.name for use in uses if (scope, use.name) not in self._masks]
            if missing:
                raise LookupError(f"scope {scope!r}: no mask dealt for {missing}")
            c = product_c(request, x, y, {use.name: self._masks[(scope, use.name)] for use in uses})
            c0 = random_ring(c.shape)
            self._pending[0].append((key, c0))
            self._pending[1].append((key, c - c0))
        dealt, share = self._pending[party].popleft()
        if dealt != key:
            raise ValueError(f"dealer material out of order: next is for {dealt}, asked for {key}")
        return share


class _OnlineSource(MaskSource):
    def __init__(self, dealer: OnlineMaskDealer, party: int) -> None:
        self._dealer, self.party = dealer, party

    def mask(self, scope: str, name: str, shape: Shape, holder: int | None = None) -> Tensor:
        return self._dealer.mask(self.party, scope, name, shape, holder)

    def product(self, scope: str, request: TripleRequest, x: Use, y: Use | None) -> Tensor:
        return self._dealer.product(self.party, scope, request, x, y)
