"""The dealer: a trusted third party that hands out Beaver material, and its delivery format.

Trust assumption: the dealer is semi-honest and does not collude with either party
(in particular not with the cloud).  It knows every triple it deals; it never sees
the parties' data.

Delivery.  For every request the dealer draws two fresh 32-byte seeds, one per party.
Each party expands its seed with AES-256-CTR (``RingStream``) into its shares a_i,
b_i and a third tensor t_i.  For one party (the "uncorrected" one) c_i = t_i.  The
other (the "correction party", party 1 by default) also receives one explicit tensor

    masked_c = (c - c_uncorrected) + t_correction,  c = op(a_0 + a_1, b_0 + b_1),

and recovers c_i = masked_c - t_i.  So a party's material costs 32 bytes, plus
8 bytes per element of c for the correction party.

All client traffic passes through the cloud (Flower's SuperLink), so material for the
client (party 1) is relayed by party 0.  The relayed ``masked_c`` is one-time padded by
t_1, which only the holder of seed 1 can compute, so the cloud learns nothing from it;
the 32-byte seed itself must travel confidentially (the transport encrypts it for the
client, e.g. X25519 key agreement + AEAD, as Flower's SecAgg+ does for its shares).
Choosing ``correction_party=0`` moves the bulky correction to the cloud, which leaves
the client 32 bytes per triple: worth it when client bandwidth is the constraint.

Offline phase: ``deal`` takes a list of requests (e.g. a program's ``requests()`` for
many steps) and returns both parties' material in that order; each party pushes its
list into a ``MaterialQueue`` ahead of time and the online phase pops from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from .randomness import SEED_BYTES, RingStream, new_seed
from .ring import check_ring_tensor
from .triples import BeaverMaterial, Shape, SquarePair, Triple, TripleRequest


def _expand(request: TripleRequest, seed: bytes) -> tuple[Tensor, Tensor | None, Tensor]:
    """Expand a seed into (a_i, b_i or None, t_i), in that draw order."""
    stream = RingStream(seed)
    a = stream.next(request.x_shape)
    b = stream.next(request.y_shape) if request.y_shape is not None else None
    return a, b, stream.next(request.out_shape)


def check_delivery(request: TripleRequest, party: int, seed: bytes, masked_c: Tensor | None) -> None:
    """The checks on one party's seeded delivery (Beaver material or a c share): party 0 or 1,
    a seed of :data:`SEED_BYTES`, a correction (if any) a ring tensor of the product's shape."""
    if party not in (0, 1) or isinstance(party, bool):
        raise ValueError(f"party must be 0 or 1, got {party!r}")
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes")
    if masked_c is not None:
        check_ring_tensor(masked_c, "masked_c")
        if tuple(masked_c.shape) != request.out_shape:
            raise ValueError(f"masked_c has shape {tuple(masked_c.shape)}, request needs {request.out_shape}")


@dataclass(frozen=True)
class SeededMaterial:
    """One party's Beaver material for one request, as delivered: a seed and maybe a correction.

    Attributes:
        request: the product this material serves.
        party: the party it is for (0 cloud, 1 client).
        seed: 32-byte AES-256-CTR seed known only to the dealer and ``party``.
        masked_c: for the correction party, (c_party + t_party); None otherwise.
    """

    request: TripleRequest
    party: int
    seed: bytes
    masked_c: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request, TripleRequest):
            raise TypeError(f"request must be a TripleRequest, got {type(self.request).__name__}")
        check_delivery(self.request, self.party, self.seed, self.masked_c)

    @property
    def nbytes(self) -> int:
        """Bytes this material costs on the wire (seed plus correction tensor)."""
        return SEED_BYTES + (8 * self.masked_c.numel() if self.masked_c is not None else 0)

    def expand(self) -> BeaverMaterial:
        """This party's triple (or square pair) shares."""
        a, b, tail = _expand(self.request, self.seed)
        c = tail if self.masked_c is None else self.masked_c - tail
        return SquarePair(a, c) if b is None else Triple(a, b, c)


class MaterialQueue:
    """One party's queue of dealer material, consumed in protocol order.

    ``draw`` checks that the next material was dealt for exactly the requested
    product, so a dealer/protocol mismatch fails loudly instead of producing garbage.
    ``refill``, if given, is called with the request when the queue is empty (used for
    on-demand dealing in-process, see ``Dealer.online_queues``).
    """

    def __init__(self, party: int, refill: Callable[[TripleRequest], None] | None = None) -> None:
        if party not in (0, 1) or isinstance(party, bool):
            raise ValueError(f"party must be 0 or 1, got {party!r}")
        self.party = party
        self._items: deque[SeededMaterial] = deque()
        self._refill = refill

    def __len__(self) -> int:
        return len(self._items)

    def extend(self, items: Iterable[SeededMaterial]) -> None:
        """Append material received from the dealer (all of it must be for this party)."""
        items = list(items)
        for item in items:
            if not isinstance(item, SeededMaterial):
                raise TypeError(f"expected SeededMaterial, got {type(item).__name__}")
            if item.party != self.party:
                raise ValueError(f"material for party {item.party} offered to party {self.party}'s queue")
        self._items.extend(items)

    def draw(self, request: TripleRequest) -> BeaverMaterial:
        """Pop and expand the next material; it must have been dealt for ``request``."""
        if not self._items and self._refill is not None:
            self._refill(request)
        if not self._items:
            raise LookupError(f"party {self.party} has no dealer material left for {request}")
        if self._items[0].request != request:
            raise ValueError(f"dealer material out of order: next is for {self._items[0].request}, asked for {request}")
        return self._items.popleft().expand()


class Dealer(ABC):
    """Provider of correlated randomness (Beaver triples and square pairs) for both parties."""

    @abstractmethod
    def deal(self, requests: Sequence[TripleRequest]) -> tuple[list[SeededMaterial], list[SeededMaterial]]:
        """Material for each request, in order: (party 0's list, party 1's list)."""

    def mul_triple(self, shape: Shape) -> tuple[SeededMaterial, SeededMaterial]:
        """Both parties' material for an element-wise product of ``shape``."""
        return self._deal_one(TripleRequest.mul(shape))

    def matmul_triple(self, x_shape: Shape, y_shape: Shape) -> tuple[SeededMaterial, SeededMaterial]:
        """Both parties' material for x [..., k] @ y [k, n]."""
        return self._deal_one(TripleRequest.matmul(x_shape, y_shape))

    def square_pair(self, shape: Shape) -> tuple[SeededMaterial, SeededMaterial]:
        """Both parties' material for squaring a tensor of ``shape``."""
        return self._deal_one(TripleRequest.square(shape))

    def _deal_one(self, request: TripleRequest) -> tuple[SeededMaterial, SeededMaterial]:
        (first0,), (first1,) = self.deal([request])
        return first0, first1

    def online_queues(self) -> tuple[MaterialQueue, MaterialQueue]:
        """Two queues (party 0, party 1) that get material dealt on demand, for in-process use."""

        def refill(request: TripleRequest) -> None:
            material0, material1 = self.deal([request])
            queue0.extend(material0)
            queue1.extend(material1)

        queue0, queue1 = MaterialQueue(0, refill), MaterialQueue(1, refill)
        return queue0, queue1


class TrustedDealer(Dealer):
    """A trusted third party that deals seed-expanded material (see the module docstring).

    Args:
        correction_party: which party receives the explicit ``masked_c`` tensors.
    """

    def __init__(self, correction_party: int = 1) -> None:
        if correction_party not in (0, 1) or isinstance(correction_party, bool):
            raise ValueError(f"correction_party must be 0 or 1, got {correction_party!r}")
        self.correction_party = correction_party

    def deal(self, requests: Sequence[TripleRequest]) -> tuple[list[SeededMaterial], list[SeededMaterial]]:
        dealt: tuple[list[SeededMaterial], list[SeededMaterial]] = ([], [])
        for request in requests:
            if not isinstance(request, TripleRequest):
                raise TypeError(f"requests must be TripleRequest, got {type(request).__name__}")
            material0, material1 = deal_seeded(request, new_seed(), new_seed(), self.correction_party)
            dealt[0].append(material0)
            dealt[1].append(material1)
        return dealt


def deal_seeded(
    request: TripleRequest, seed0: bytes, seed1: bytes, correction_party: int = 1
) -> tuple[SeededMaterial, SeededMaterial]:
    """Both parties' material for ``request`` from given per-party seeds (party 0's, party 1's).

    The seeds must be fresh, uniform and known only to the dealer and their party; a
    dealer that derives them from per-party keys (instead of drawing and sending them)
    uses this so that only the correction tensor has to travel.
    """
    if correction_party not in (0, 1) or isinstance(correction_party, bool):
        raise ValueError(f"correction_party must be 0 or 1, got {correction_party!r}")
    seeds = (seed0, seed1)
    fixed, corrected = 1 - correction_party, correction_party
    a_f, b_f, c_f = _expand(request, seeds[fixed])
    a_c, b_c, pad = _expand(request, seeds[corrected])
    b = b_f + b_c if b_f is not None and b_c is not None else None
    c = request.evaluate(a_f + a_c, b)
    materials = {
        fixed: SeededMaterial(request, fixed, seeds[fixed]),
        corrected: SeededMaterial(request, corrected, seeds[corrected], c - c_f + pad),
    }
    return materials[0], materials[1]
