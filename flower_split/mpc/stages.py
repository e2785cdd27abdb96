"""Secure computations as a fixed sequence of stages, each costing one exchange.

A ``Program`` is a tuple of ``Stage``s.  A stage holds Beaver ``Product``s that are
independent of each other, so all their openings travel in one message per
direction; after the products are finished, an optional local step derives further
values (additions, public scalings, truncations).  A protocol layer drives a program
for one party like this, keeping ``PartyState`` between messages:

    for stage in program.stages:
        mine = stage.begin(state, source)       # list of opened tensors, one per new mask
        theirs = exchange(mine)                 # one message each way
        stage.finish(state, theirs)

and may fold the openings of the same stage of many batches or tenants into one
message.  ``Program.requests()`` lists the products' c material the program consumes,
in order, so the dealer can deal it ahead of time (offline phase).

Operands are named values (``masks.Use``): a value is masked and opened once per scope
(``PartyState.scope``, e.g. one module of one step), the first time a stage uses it;
later products of the same scope, in the same or a later program, reuse the opening
(``correlated``).  So what a stage sends depends on the names its scope opened before:
``Stage.opens``.

Programs are built for fixed shapes; ``begin`` checks every operand against the
shapes the program declared and ``finish`` checks the peer's openings, so a
malformed or out-of-order message raises a clear error and leaves the state as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .beaver import PendingProduct, begin, held_form
from .correlated import MaskSource
from .masks import MaskRecord, Use, apply_view
from .share import AdditiveShare
from .triples import Op, SquarePair, Triple, TripleRequest

Values = Mapping[str, AdditiveShare]


@dataclass
class PartyState:
    """One party's named shares and mask records in one scope, plus the stage awaiting openings.

    ``scope`` names what the masks are dealt for (the protocol: the module, within a step);
    two states of one dealer must not share a scope.  ``masks`` maps a value name to the
    record of its one opening (``masks.MaskRecord``).
    """

    party: int
    values: dict[str, AdditiveShare] = field(default_factory=dict)
    pending: tuple[str, list[PendingProduct]] | None = None
    scope: str = ""
    masks: dict[str, MaskRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.party not in (0, 1) or isinstance(self.party, bool):
            raise ValueError(f"party must be 0 or 1, got {self.party!r}")


@dataclass(frozen=True)
class Product:
    """``values[out] = op(x, y)``: operands are named values seen through views (``masks.Use``)."""

    out: str
    request: TripleRequest
    x: Use
    y: Use | None = None

    def __post_init__(self) -> None:
        if (self.y is None) != (self.request.op is Op.SQUARE):
            raise ValueError(f"product {self.out!r}: a square takes one operand, other products two")
        for name, use, shape in (("x", self.x, self.request.x_shape), ("y", self.y, self.request.y_shape)):
            if use is not None and use.viewed != shape:
                raise ValueError(f"product {self.out!r}: operand {name} is {use.viewed}, the request says {shape}")

    @property
    def uses(self) -> tuple[Use, ...]:
        return (self.x,) if self.y is None else (self.x, self.y)


@dataclass(frozen=True)
class Stage:
    """Independent products opened together (one round), then an optional local step.

    ``local`` maps the values (including this stage's products) to new named values.
    """

    name: str
    products: tuple[Product, ...]
    local: Callable[[Values], dict[str, AdditiveShare]] | None = None

    def opens(self, opened: Collection[str]) -> tuple[Use, ...]:
        """The values this stage masks and opens, given the names its scope opened before.

        Each at its first use, in product order; a value used twice here is opened once.
        """
        seen, new = set(opened), []
        for product in self.products:
            for use in product.uses:
                if use.name not in seen:
                    seen.add(use.name)
                    new.append(use)
        return tuple(new)

    def sends(self, opened: Collection[str], party: int) -> tuple[Use, ...]:
        """The values of ``opens`` whose opening ``party`` sends: all but those the peer holds."""
        return tuple(use for use in self.opens(opened) if use.sent_by(party))

    def _operands(self, state: PartyState) -> dict[str, AdditiveShare]:
        """The named values the products use, checked against the declared party and shapes."""
        values: dict[str, AdditiveShare] = {}
        for product in self.products:
            for use in product.uses:
                value = state.values.get(use.name)
                if value is None:
                    raise ValueError(f"stage {self.name!r}: no value named {use.name!r}")
                if value.party != state.party:
                    raise ValueError(f"stage {self.name!r}: party {state.party} holds a share of party {value.party}")
                if tuple(value.shape) != use.shape:
                    raise ValueError(f"stage {self.name!r}, product {product.out!r}: operand {use.name!r} has "
                                     f"shape {tuple(value.shape)}, the program declared {use.shape}")
                if not use.sent_by(state.party) and use.name not in values and bool(value.data.any()):
                    raise ValueError(f"stage {self.name!r}: party {use.holder} holds {use.name!r}, so party "
                                     f"{state.party}'s share of it must be 0")
                values[use.name] = value
        return values

    def begin(self, state: PartyState, source: MaskSource) -> list[Tensor]:
        """Start every product; returns this party's openings of the values first masked here.

        Values opened by an earlier stage of the scope are not sent again; each must still be
        the tensor its mask opened (``MaskRecord.check_bound``).
        """
        if state.pending is not None:
            raise ValueError(f"stage {self.name!r} begun while stage {state.pending[0]!r} awaits openings")
        if source.party != state.party:
            raise ValueError(f"party {state.party} given party {source.party}'s material source")
        values = self._operands(state)
        for name, record in state.masks.items():
            if name in values:
                record.check_bound(name, values[name])
        new = self.opens(state.masks)
        records = dict(state.masks)
        for use in new:
            mask = source.mask(state.scope, use.name, use.shape, use.holder)
            records[use.name] = MaskRecord.open(values[use.name], mask)
        pending = []
        for product in self.products:
            c = source.product(state.scope, product.request, product.x, product.y)
            a = apply_view(product.x.view, records[product.x.name].share)
            opened = [apply_view(product.x.view, records[product.x.name].sent)]  # x - a, as the mask opened it
            if product.y is None:
                material: Triple | SquarePair = SquarePair(a, c)
                y, y_holder = None, None
            else:
                b = apply_view(product.y.view, records[product.y.name].share)
                material, y = Triple(a, b, c), product.y.of(values[product.y.name])
                y_holder = product.y.holder
                opened.append(apply_view(product.y.view, records[product.y.name].sent))
            pending.append(begin(product.request, product.x.of(values[product.x.name]), y, material,
                                 product.x.holder, y_holder, tuple(opened))[0])
        state.masks = records
        state.pending = (self.name, pending)
        return [records[use.name].sent for use in new if use.sent_by(state.party)]

    def finish(self, state: PartyState, received: Sequence[Tensor]) -> None:
        """Complete the products with the peer's openings (one per new mask it sends), then run the
        local step. A value this party holds has no peer opening (the peer's part is 0)."""
        if state.pending is None or state.pending[0] != self.name:
            awaiting = None if state.pending is None else state.pending[0]
            raise ValueError(f"stage {self.name!r} finished, but the pending stage is {awaiting!r}")
        pending = state.pending[1]
        opened = [name for name, record in state.masks.items() if record.received is None]
        new = self.opens(set(state.masks) - set(opened))
        peer = 1 - state.party
        expected = [use for use in new if use.sent_by(peer)]
        if [use.name for use in new] != opened or len(received) != len(expected):
            raise ValueError(f"stage {self.name!r} expects {len(expected)} openings, got {len(received)}")
        records = dict(state.masks)
        given = iter(received)
        for use in new:
            opening = next(given) if use.sent_by(peer) else torch.zeros(use.shape, dtype=torch.int64)
            records[use.name] = records[use.name].completed(opening)
        results = {
            product.out: started.finish(tuple(records[use.name].peer_part(use.view) for use in product.uses))
            for product, started in zip(self.products, pending)
        }
        if self.local is not None:
            results |= self.local({**state.values, **results})
        state.values.update(results)
        state.masks = records
        state.pending = None


@dataclass(frozen=True)
class Program:
    """A named sequence of stages with declared inputs and outputs."""

    name: str
    stages: tuple[Stage, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        shapes: dict[str, tuple[tuple[int, ...], int | None]] = {}
        for stage in self.stages:
            for product in stage.products:
                for use in product.uses:
                    if shapes.setdefault(use.name, (use.shape, use.holder)) != (use.shape, use.holder):
                        raise ValueError(f"program {self.name!r}: value {use.name!r} is used with (shape, holder) "
                                         f"{shapes[use.name]} and {(use.shape, use.holder)}")
                held_form(product.request.op, product.x.holder, None if product.y is None else product.y.holder)

    def products(self) -> list[Product]:
        """Every product, in the order the program draws their c material."""
        return [product for stage in self.stages for product in stage.products]

    def requests(self) -> list[TripleRequest]:
        """The products' c material this program draws, in order."""
        return [product.request for product in self.products()]

    def uses(self) -> dict[str, Use]:
        """Every value the program masks (first use of each name), by name."""
        return {use.name: use for stage in self.stages for use in stage.opens(())}

    @property
    def rounds(self) -> int:
        """Exchanges (one message each way) per run."""
        return len(self.stages)

    def opened_elements(self, opened: Collection[str] = (), party: int | None = None) -> int:
        """Ring elements ``party`` sends per run (8 bytes each; None: a party holding no value),
        given names its scope opened before."""
        seen, total = set(opened), 0
        for stage in self.stages:
            new = stage.opens(seen)
            total += sum(use.elements for use in new if party is None and use.holder is None
                         or party is not None and use.sent_by(party))
            seen |= {use.name for use in new}
        return total
