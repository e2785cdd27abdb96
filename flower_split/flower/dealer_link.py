"""How the secure strategy reaches the dealer: a node of its own, or (insecure) its own process.

:class:`NodeDealer` (the default) sends every request to the dealer's SuperNode as one
Flower message for all tenants concerned; the ServerApp holds nothing of the dealer but
its public session key. :class:`ColocatedDealer` keeps a :class:`SecureDealerParty` in the
ServerApp's process (``insecure-colocated-dealer``): then the cloud holds every tenant's
Beaver material and can open everything, so it is for tests and demos only and says so in
the log every round.

Every method answers per tenant: a value, or an error string for that tenant alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from logging import WARNING
from typing import Callable, TypeVar

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flower_split.flower.contract import MessageType
from flower_split.flower.dealer_records import (
    pack_hello_request, pack_registrations, pack_requests, unpack_bundles, unpack_hellos, unpack_outcome,
)
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.protocol.secure_messages import DealerHello, DealerRegistration, MaterialBundle, MaterialRequest

Outcome = dict[str, str]  # tenant -> error ("" for success)
T = TypeVar("T")


class DealerLink(ABC):
    """The dealer as the secure strategy sees it."""

    colocated: bool = False

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether requests can be sent (a node dealer must have been found)."""

    @abstractmethod
    def hellos(self, grid: Grid, tenants: list[str]) -> dict[str, DealerHello | str]:
        """One signed hello per tenant."""

    @abstractmethod
    def register(self, grid: Grid, registrations: list[DealerRegistration]) -> Outcome:
        """Register tenants' public keys with the dealer."""

    @abstractmethod
    def material(self, grid: Grid, requests: list[MaterialRequest]) -> dict[str, MaterialBundle | str]:
        """Each tenant's sealed material for the step it asks (a round trip of its own)."""

    def material_message(self, requests: list[MaterialRequest]) -> Message | None:
        """The request as a message to send along with a round trip to the tenants (None: no node)."""
        return None

    def material_reply(self, reply: Message | None, requests: list[MaterialRequest]) -> dict[str, MaterialBundle | str]:
        """The bundles of :meth:`material_message`'s ``reply`` (None: it did not come)."""
        return {r.tenant: "no reply from the dealer" for r in requests}

    def round_started(self, server_round: int) -> None:
        """Called at the start of every round (the co-located dealer warns there)."""


class ColocatedDealer(DealerLink):
    """The dealer inside the ServerApp (``insecure-colocated-dealer = true``): no protection."""

    colocated = True

    def __init__(self, party: SecureDealerParty) -> None:
        self.party = party

    @property
    def ready(self) -> bool:
        return True

    def hellos(self, grid: Grid, tenants: list[str]) -> dict[str, DealerHello | str]:
        return {t: _try(lambda t=t: self.party.hello(t)) for t in tenants}

    def register(self, grid: Grid, registrations: list[DealerRegistration]) -> Outcome:
        return {r.tenant: _error(lambda r=r: self.party.register(r)) for r in registrations}

    def material(self, grid: Grid, requests: list[MaterialRequest]) -> dict[str, MaterialBundle | str]:
        return self._deal(requests)

    def material_reply(self, reply: Message | None, requests: list[MaterialRequest]) -> dict[str, MaterialBundle | str]:
        return self._deal(requests)  # in process: nothing was sent

    def _deal(self, requests: list[MaterialRequest]) -> dict[str, MaterialBundle | str]:
        return {r.tenant: _try(lambda r=r: self.party.handle(r)) for r in requests}

    def round_started(self, server_round: int) -> None:
        log(WARNING, "round %d: insecure-colocated-dealer = true: the dealer runs inside the ServerApp, so the cloud "
                     "holds every tenant's Beaver material and can open all it sends (tests and demos only)",
            server_round)


class NodeDealer(DealerLink):
    """The dealer's own SuperNode, reached through the grid."""

    def __init__(self, timeout: float | None, pinned: bytes | None = None) -> None:
        """``pinned``: the dealer's long-term public key the ServerApp expects (run config
        ``expected-dealer-key``; public); a node claiming the role under another key, or
        whose hellos do not verify under it, is refused. None: the first dealer node is taken
        (tenants still verify against their own pins)."""
        self.node: int | None = None
        self.timeout = timeout
        self.pinned = pinned

    @property
    def ready(self) -> bool:
        return self.node is not None

    def _call(self, grid: Grid, message_type: str, content: RecordDict) -> RecordDict:
        if self.node is None:
            raise ProtocolError("no dealer node has joined the federation (node config role = \"dealer\")")
        message = Message(content=content, dst_node_id=self.node, message_type=message_type)
        replies = list(grid.send_and_receive([message], timeout=self.timeout))
        if not replies:
            raise ProtocolError(f"{message_type}: the dealer node {self.node} did not reply within {self.timeout} s")
        if replies[0].has_error():
            raise ProtocolError(f"{message_type}: the dealer node replied with an error: {replies[0].error.reason}")
        return replies[0].content

    def hellos(self, grid: Grid, tenants: list[str]) -> dict[str, DealerHello | str]:
        try:
            got = unpack_hellos(self._call(grid, MessageType.DEALER_HELLO, pack_hello_request(tenants)))
        except ProtocolError as exc:
            return {t: str(exc) for t in tenants}
        return {t: got.get(t, "the dealer sent no hello for this tenant") for t in tenants}

    def claimant_hellos(self, grid: Grid, nodes: list[int], name: str,
                        timeout: float | None) -> dict[int, DealerHello | str]:
        """A hello for ``name`` from each node claiming the dealer role, all in one round trip
        of at most ``timeout`` seconds (a silent claimant costs one wait, not one each)."""
        messages = [Message(content=pack_hello_request([name]), dst_node_id=node,
                            message_type=MessageType.DEALER_HELLO) for node in nodes]
        got: dict[int, DealerHello | str] = {node: f"no reply within {timeout} s" for node in nodes}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in got:
                continue
            try:
                if reply.has_error():
                    raise ProtocolError(f"replied with an error: {reply.error.reason}")
                got[node] = unpack_hellos(reply.content).get(name, "no hello for the name asked")
            except ProtocolError as exc:
                got[node] = str(exc)
        return got

    def register(self, grid: Grid, registrations: list[DealerRegistration]) -> Outcome:
        tenants = [r.tenant for r in registrations]
        try:
            outcome = unpack_outcome(self._call(grid, MessageType.DEALER_REGISTER, pack_registrations(registrations)))
        except ProtocolError as exc:
            return {t: str(exc) for t in tenants}
        return {t: outcome.get(t, "the dealer did not answer for this tenant") for t in tenants}

    def material(self, grid: Grid, requests: list[MaterialRequest]) -> dict[str, MaterialBundle | str]:
        """:meth:`material_message` sent on its own round trip, its reply read by :meth:`material_reply`."""
        message = self.material_message(requests)
        if message is None:
            return {} if not requests else {r.tenant: "no dealer node has joined the federation (node config "
                                            "role = \"dealer\")" for r in requests}
        replies = list(grid.send_and_receive([message], timeout=self.timeout))
        return self.material_reply(replies[0] if replies else None, requests)

    def material_message(self, requests: list[MaterialRequest]) -> Message | None:
        if self.node is None or not requests:
            return None
        return Message(content=pack_requests(requests), dst_node_id=self.node, message_type=MessageType.DEALER_MATERIAL)

    def material_reply(self, reply: Message | None, requests: list[MaterialRequest]) -> dict[str, MaterialBundle | str]:
        steps = {r.tenant: r.step for r in requests}
        if reply is None:
            return {t: f"the dealer node did not reply within {self.timeout} s" for t in steps}
        if reply.has_error():
            return {t: f"the dealer node replied with an error: {reply.error.reason}" for t in steps}
        try:
            return unpack_bundles(reply.content, steps)
        except ProtocolError as exc:
            return {t: str(exc) for t in steps}


def _try(fn: Callable[[], T]) -> T | str:
    """``fn()``, or its ProtocolError as a string (that tenant's error)."""
    try:
        return fn()
    except ProtocolError as exc:
        return str(exc)


def _error(fn: Callable[[], None]) -> str:
    result = _try(fn)
    return result if isinstance(result, str) else ""
