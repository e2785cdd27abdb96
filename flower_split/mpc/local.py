"""Both parties in one process: the in-process driver for tests, benchmarks and examples.

``LocalTwoParty`` plays the cloud (party 0) and the client (party 1) side by side: it
draws both parties' material from a dealer on demand, runs each party's ``begin``,
swaps the openings as a transport would, and runs each party's ``finish``.  It counts
rounds and the bytes each party sends, so costs can be read off a run.  Programs get
correlated material (one mask per value and scope) from an ``OnlineMaskDealer``; the single
products ``mul`` / ``matmul`` / ``square`` get ordinary triples from ``dealer``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .beaver import begin
from .correlated import OnlineMaskDealer
from .dealer import Dealer, TrustedDealer
from .share import AdditiveShare
from .stages import PartyState, Program
from .triples import TripleRequest

SharePair = tuple[AdditiveShare, AdditiveShare]
"""(party 0's share, party 1's share) of one value."""


class LocalTwoParty:
    """An in-process two-party driver with an on-demand dealer and traffic counters.

    Attributes:
        rounds: exchanges performed (one message each way per round).
        bytes_sent: bytes of openings sent by party 0 and by party 1.
    """

    def __init__(self, dealer: Dealer | None = None) -> None:
        self.queues = (dealer if dealer is not None else TrustedDealer()).online_queues()
        self.sources = OnlineMaskDealer().sources()
        self.rounds = 0
        self.bytes_sent = [0, 0]

    def exchange(self, sent0: Sequence[Tensor], sent1: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Deliver one round of opened tensors; returns (what party 0 receives, what party 1 receives)."""
        self.rounds += 1
        for party, sent in ((0, sent0), (1, sent1)):
            self.bytes_sent[party] += sum(8 * tensor.numel() for tensor in sent)
        return list(sent1), list(sent0)

    def _product(self, request: TripleRequest, x: SharePair, y: SharePair | None) -> SharePair:
        started = [
            begin(request, x[party], None if y is None else y[party], self.queues[party].draw(request))
            for party in (0, 1)
        ]
        received0, received1 = self.exchange(started[0][1], started[1][1])
        return started[0][0].finish(received0), started[1][0].finish(received1)

    def mul(self, x: SharePair, y: SharePair) -> SharePair:
        """Shares of x * y (element-wise), one round."""
        return self._product(TripleRequest.mul(tuple(x[0].shape)), x, y)

    def matmul(self, x: SharePair, y: SharePair) -> SharePair:
        """Shares of x [..., k] @ y [k, n], one round."""
        return self._product(TripleRequest.matmul(tuple(x[0].shape), tuple(y[0].shape)), x, y)

    def square(self, x: SharePair) -> SharePair:
        """Shares of x * x, one round."""
        return self._product(TripleRequest.square(tuple(x[0].shape)), x, None)

    def run(self, program: Program, state0: PartyState, state1: PartyState) -> None:
        """Run every stage of ``program`` for both parties (give each pair of states its own scope)."""
        for stage in program.stages:
            sent0 = stage.begin(state0, self.sources[0])
            sent1 = stage.begin(state1, self.sources[1])
            received0, received1 = self.exchange(sent0, sent1)
            stage.finish(state0, received0)
            stage.finish(state1, received1)
