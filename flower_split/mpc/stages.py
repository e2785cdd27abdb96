"""Secure computations as a fixed sequence of stages, each costing one exchange.

A ``Program`` is a tuple of ``Stage``s.  A stage holds Beaver ``Product``s that are
independent of each other, so all their openings travel in one message per
direction; after the products are finished, an optional local step derives further
values (additions, public scalings, truncations).  A protocol layer drives a program
for one party like this, keeping ``PartyState`` between messages:

    for stage in program.stages:
        mine = stage.begin(state, queue)        # list of openings, one per product
        theirs = exchange(mine)                 # one message each way
        stage.finish(state, theirs)

and may fold the openings of the same stage of many batches or tenants into one
message.  ``Program.requests()`` lists the Beaver material the program consumes, in
order, so the dealer can deal it ahead of time (offline phase).

Programs are built for fixed shapes; ``begin`` checks every operand against the
shapes the program declared and ``finish`` checks the peer's openings, so a
malformed or out-of-order message raises a clear error and leaves the state as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .beaver import Opening, PendingProduct, begin
from .dealer import MaterialQueue
from .share import AdditiveShare
from .triples import TripleRequest

Values = Mapping[str, AdditiveShare]
Operand = Callable[[Values], AdditiveShare]
"""Picks (and locally reshapes/transposes) an operand from the named values of a party."""


@dataclass
class PartyState:
    """One party's named shares, plus the products of the stage awaiting the peer's openings."""

    party: int
    values: dict[str, AdditiveShare] = field(default_factory=dict)
    pending: tuple[str, list[PendingProduct]] | None = None

    def __post_init__(self) -> None:
        if self.party not in (0, 1) or isinstance(self.party, bool):
            raise ValueError(f"party must be 0 or 1, got {self.party!r}")


@dataclass(frozen=True)
class Product:
    """``values[out] = op(x(values), y(values))`` with Beaver material for ``request``."""

    out: str
    request: TripleRequest
    x: Operand
    y: Operand | None = None


@dataclass(frozen=True)
class Stage:
    """Independent products opened together (one round), then an optional local step.

    ``local`` maps the values (including this stage's products) to new named values.
    """

    name: str
    products: tuple[Product, ...]
    local: Callable[[Values], dict[str, AdditiveShare]] | None = None

    def begin(self, state: PartyState, queue: MaterialQueue) -> list[Opening]:
        """Start every product of this stage; returns the openings to send (one per product)."""
        if state.pending is not None:
            raise ValueError(f"stage {self.name!r} begun while stage {state.pending[0]!r} awaits openings")
        if queue.party != state.party:
            raise ValueError(f"party {state.party} given party {queue.party}'s material queue")
        operands = []
        for product in self.products:
            try:
                x = product.x(state.values)
                y = product.y(state.values) if product.y is not None else None
            except KeyError as missing:
                raise ValueError(f"stage {self.name!r}: no value named {missing.args[0]!r}") from None
            shapes = (product.request.x_shape, product.request.y_shape)
            for name, operand, shape in zip("xy", (x, y), shapes):
                if operand is None:
                    continue
                if operand.party != state.party:
                    raise ValueError(f"stage {self.name!r}: party {state.party} holds a share of party {operand.party}")
                if tuple(operand.shape) != shape:
                    raise ValueError(
                        f"stage {self.name!r}, product {product.out!r}: operand {name} has shape "
                        f"{tuple(operand.shape)}, the program declared {shape}"
                    )
            operands.append((x, y))
        pending, openings = [], []
        for product, (x, y) in zip(self.products, operands):
            started, opening = begin(product.request, x, y, queue.draw(product.request))
            pending.append(started)
            openings.append(opening)
        state.pending = (self.name, pending)
        return openings

    def finish(self, state: PartyState, received: Sequence[Opening]) -> None:
        """Complete the products with the peer's openings, then run the local step."""
        if state.pending is None or state.pending[0] != self.name:
            awaiting = None if state.pending is None else state.pending[0]
            raise ValueError(f"stage {self.name!r} finished, but the pending stage is {awaiting!r}")
        pending = state.pending[1]
        if len(received) != len(pending):
            raise ValueError(f"stage {self.name!r} expects {len(pending)} openings, got {len(received)}")
        results = {
            product.out: started.finish(opening)
            for product, started, opening in zip(self.products, pending, received)
        }
        if self.local is not None:
            results |= self.local({**state.values, **results})
        state.values.update(results)
        state.pending = None


@dataclass(frozen=True)
class Program:
    """A named sequence of stages with declared inputs and outputs."""

    name: str
    stages: tuple[Stage, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def requests(self) -> list[TripleRequest]:
        """The Beaver material this program draws, in order."""
        return [product.request for stage in self.stages for product in stage.products]

    @property
    def rounds(self) -> int:
        """Exchanges (one message each way) per run."""
        return len(self.stages)

    def opened_elements(self) -> int:
        """Ring elements each party sends per run (8 bytes each)."""
        return sum(request.opened_elements for request in self.requests())
