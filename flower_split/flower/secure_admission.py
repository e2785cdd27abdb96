"""Admitting nodes to a secure run: roles, tenant-id binding, the dealer, the set-up.

New nodes are asked their role (``query.role``, one round trip for all of them, of at most
``QUERY_TIMEOUT``); a node that does not answer is parked with a back-off, so a silent node
costs neither every poll nor every round a wait. The dealer's node becomes the strategy's
:class:`NodeDealer` target, and no round starts while it is not connected (a restarted
dealer SuperNode: the round waits up to node-wait-timeout). With ``expected-dealer-key``
pinned, a claimant becomes the dealer only once it proves that key, at the start as when
the dealer is back under a new node id (unpinned, the first claimant is taken and a second
dealer-role node is refused). Every tenant node declares
its tenant id there, and the id is **bound to that Flower node** (the node id the SuperLink
gave the authenticated SuperNode): a second node that claims a bound id is refused, logged,
and never selected again, so a late impostor cannot take over a tenant or its halves.
(The first claim wins: with SuperNode authentication only registered nodes can claim at
all; docs/deployment.md says how to keep registration closed.)

Set-up, once a dealer is there: one signed hello per tenant from the dealer, relayed to
each tenant (``train.secure_setup``), whose :class:`ClientSetup` the cloud registers and
forwards to the dealer (one ``query.dealer_register`` for all of them). A tenant that fails
any stage is left out and tried again at the next round. A cloud resumed from its checkpoint
sets up no tenant it holds: each claimant of such a tenant must first prove it holds the
tenant's key (``train.secure_resume``), and an impostor is refused.
"""

from __future__ import annotations

import secrets
import time
from logging import INFO, WARNING
from typing import Callable

from flwr.app import ConfigRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flower_split.flower.contract import MessageType, RecordKey
from flower_split.flower.dealer_link import DealerLink, NodeDealer
from flower_split.flower.dealer_node import DEALER_ROLE, ROLES, TENANT_ROLE
from flower_split.flower.records import read_record, typed_value
from flower_split.flower.secure_records import pack_hello, unpack_setup
from flower_split.flower.strategy_utils import Exchange
from flower_split.protocol import ProtocolError, resume_proof
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.dealer_identity import verify_hello
from flower_split.protocol.secure_messages import DealerHello, DealerRegistration


class SecureAdmission:
    """Mixin of the secure strategy: who is who, and the set-up of new tenants."""

    cloud: SecureCloudParty
    dealer: DealerLink
    tenant_of: dict[int, str]
    min_nodes: int
    node_wait_timeout: float
    reply_timeout: float | None
    exchange: Callable[..., dict[int, RecordDict]]

    def _init_admission(self) -> None:
        self.dealer_nodes: set[int] = set()
        self.refused: dict[int, str] = {}  # node -> why it is never selected
        self.restored: set[str] = set()  # tenants the cloud resumed from saved state, not yet bound
        self.parked: dict[int, tuple[float, float]] = {}  # silent node -> (not asked before, its back-off)

    @property
    def query_timeout(self) -> float:
        """The wait for a new node's role or a dealer claimant's hello: a node that has joined
        answers at once, so a silent one costs at most this, not a whole reply-timeout."""
        return QUERY_TIMEOUT if self.reply_timeout is None else min(self.reply_timeout, QUERY_TIMEOUT)

    def _park(self, node: int) -> None:
        """``node`` gave no valid answer: not asked again for a back-off that doubles each time it
        is silent (a silent node must not cost every poll, or every round, a wait)."""
        backoff = min(2 * self.parked.get(node, (0.0, PARK_FIRST / 2))[1], PARK_MAX)
        self.parked[node] = (time.monotonic() + backoff, backoff)
        log(WARNING, "node %d gave no answer: not asked again for %.0f s", node, backoff)

    def select(self, grid: Grid) -> set[int]:
        """The tenant nodes set up, once at least ``min_nodes`` tenants are and the dealer node is
        connected: a round never runs empty because the dealer node is late or down (restarted;
        every step would fail without it). TimeoutError after ``node_wait_timeout`` seconds."""
        started = time.monotonic()
        waiting = False  # for a dealer node that had joined and is gone
        while True:
            admitted = self.admit_nodes(grid, set(grid.get_node_ids()))
            nodes = set(grid.get_node_ids())  # again: admission may have waited on a silent node
            admitted &= nodes
            dealer_up = self._dealer_connected(nodes)
            if len(admitted) >= self.min_nodes and dealer_up:
                if waiting:
                    log(INFO, "the dealer node %s is connected: the round starts after %.1f s", self.dealer_node(),
                        time.monotonic() - started)
                return admitted
            if not dealer_up and self.dealer.ready and not waiting:
                waiting = True
                log(WARNING, "the dealer node %s is not connected: the round waits for it (node-wait-timeout %.0f s)",
                    self.dealer_node(), self.node_wait_timeout)
            if time.monotonic() > started + self.node_wait_timeout:
                missing = "" if dealer_up else "; no dealer node joined" if not self.dealer.ready else \
                    f"; the dealer node {self.dealer_node()} is not connected"
                raise TimeoutError(f"{len(admitted)} of the {self.min_nodes} required tenants set up{missing}")
            time.sleep(1.0)

    def dealer_node(self) -> int | None:
        """The dealer's node id (None: a co-located dealer, or no dealer node yet)."""
        return self.dealer.node if isinstance(self.dealer, NodeDealer) else None

    def _dealer_connected(self, nodes: set[int]) -> bool:
        return not isinstance(self.dealer, NodeDealer) or self.dealer.node in nodes

    def admit_nodes(self, grid: Grid, nodes: set[int]) -> set[int]:
        """New nodes: roles, bindings, set-up (failures left out); the tenant nodes set up."""
        now = time.monotonic()
        new = {n for n in nodes - set(self.tenant_of) - self.dealer_nodes - set(self.refused)
               if self.parked.get(n, (now, 0.0))[0] <= now}
        if new:
            claims = self._claims(grid, new, nodes)
            self._resume(grid, {n: claims.pop(n) for n in list(claims) if claims[n] in self.restored})
            if claims and not self.dealer.ready:
                log(WARNING, "%d tenant node(s) wait: no dealer node has joined yet (node config role = \"dealer\")",
                    len(claims))
            elif claims:
                self._setup(grid, claims)
        return {n for n in nodes if n in self.tenant_of}

    def _claims(self, grid: Grid, nodes: set[int], connected: set[int]) -> dict[int, str]:
        """Ask the new ``nodes`` their role; take the dealer; the tenant ids the others may claim."""
        replies = self.exchange(grid, MessageType.ROLE, {n: RecordDict() for n in nodes}, 0, Exchange(), set(nodes),
                                timeout=self.query_timeout)
        for node in nodes - set(replies):
            self._park(node)
        claims: dict[int, str] = {}
        dealers: dict[int, bytes] = {}
        bound = {tenant: node for node, tenant in self.tenant_of.items()}
        for node in sorted(replies):
            try:
                role, tenant, identity = _role(replies[node])
            except ProtocolError as exc:
                log(WARNING, "node %d: bad role reply: %s", node, exc)
                continue
            if role == DEALER_ROLE:
                dealers[node] = identity
            elif tenant in bound or (tenant in claims.values() and tenant not in self.restored):
                other = bound.get(tenant, next((n for n, t in claims.items() if t == tenant), -1))
                self.refused[node] = f"claims tenant {tenant!r}, bound to node {other}"
                log(WARNING, "node %d refused: it claims tenant %r, which is bound to node %d", node, tenant, other)
            else:
                claims[node] = tenant
        if dealers:
            self._take_dealer(grid, dealers, connected)
        return claims

    def _resume(self, grid: Grid, claims: dict[int, str]) -> None:
        """Bind each tenant the cloud resumed from its checkpoint to the claimant that proves it
        holds the tenant's key (:mod:`~flower_split.protocol.resume_proof`); no new set-up, the
        node resumes from its own saved state. A wrong proof is an impostor: refused for good;
        no answer (e.g. a node without its state) is tried again later."""
        if not claims:
            return
        challenges = {node: resume_proof.challenge() for node in claims}
        contents = {node: RecordDict({RecordKey.RESUME: ConfigRecord({"ephemeral": public, "nonce": nonce})})
                    for node, (_, public, nonce) in challenges.items()}
        replies = self.exchange(grid, MessageType.SECURE_RESUME, contents, 0, Exchange(), set(contents))
        for node in sorted(replies):
            tenant, (ephemeral, _, nonce) = claims[node], challenges[node]
            record = replies[node].get(RecordKey.RESUME)
            proof = record.get("proof") if isinstance(record, ConfigRecord) else None
            client_public = self.cloud.tenants[tenant].setup.client_public
            if tenant in self.restored and resume_proof.verify(ephemeral, client_public, nonce, tenant, proof):
                self.restored.discard(tenant)
                self.tenant_of[node] = tenant
                log(INFO, "node %d: tenant %s resumed from saved state (key proven)", node, tenant)
            else:
                self._refuse(node, f"claims resumed tenant {tenant!r} without proving its key")

    def _take_dealer(self, grid: Grid, claimants: dict[int, bytes], connected: set[int]) -> None:
        """Nodes claiming the dealer role (node -> claimed identity). Unpinned: the first is the
        dealer. Pinned (``expected-dealer-key``): a claim is public bytes, so while no dealer
        node is connected the claimants must prove the key (:meth:`_prove_dealer`), at the
        start as after a restart; another identity is refused, and so is any claimant while
        a proven dealer node is connected."""
        if not isinstance(self.dealer, NodeDealer):
            for node in claimants:
                self._refuse(node, "a dealer node, but this run's dealer is co-located")
            return
        pinned = self.dealer.pinned
        candidates = []
        for node in sorted(claimants):
            if pinned is not None and claimants[node] != pinned:
                self._refuse(node, "a dealer node with another identity than the pinned one (expected-dealer-key)")
            elif self.dealer.node is None and pinned is None:
                self.dealer.node = node
                self.dealer_nodes.add(node)
                log(INFO, "node %d is the dealer", node)
            elif self.dealer.node is not None and (pinned is None or self.dealer.node in connected):
                self._refuse(node, "a second dealer node")
            else:
                candidates.append(node)
        if candidates and pinned is not None:
            self._prove_dealer(grid, candidates, pinned)

    def _prove_dealer(self, grid: Grid, candidates: list[int], pinned: bytes) -> None:
        """The first of ``candidates`` that signs a hello for a fresh name under the pinned key,
        for the session key the cloud holds (if any), becomes the dealer (a replayed hello names
        another tenant). All are asked in one round trip; a wrong signature is refused; no
        answer is parked and asked again later, so a silent claimant never locks the dealer out."""
        assert isinstance(self.dealer, NodeDealer)
        name = f"dealer-check-{secrets.token_hex(8)}"
        hellos = self.dealer.claimant_hellos(grid, candidates, name, self.query_timeout)
        taken = False
        for node in candidates:
            hello = hellos[node]
            if isinstance(hello, str):
                log(WARNING, "node %d claims the dealer role; its hello failed: %s", node, hello)
                self._park(node)
                continue
            try:
                verify_hello(pinned, hello, name)
                if self.cloud.dealer_public is not None and hello.dealer_public != self.cloud.dealer_public:
                    raise ProtocolError("its session key is not the one the tenants agreed keys with")
            except ProtocolError as exc:
                self._refuse(node, f"it claims the dealer role under the pinned key but fails its check ({exc})")
                continue
            if taken:
                self._refuse(node, "a second dealer node")
                continue
            taken = True
            old, self.dealer.node = self.dealer.node, node
            self.dealer_nodes.add(node)
            if old is None:
                log(INFO, "node %d is the dealer (pinned key proven)", node)
            else:
                log(INFO, "node %d is the dealer again (pinned key proven): node %s, the dealer before, is gone",
                    node, old)

    def _refuse(self, node: int, why: str) -> None:
        self.refused[node] = why
        log(WARNING, "node %d refused: %s", node, why)

    def _setup(self, grid: Grid, claims: dict[int, str]) -> None:
        hellos = self.dealer.hellos(grid, sorted(claims.values()))
        if self._impostor_dealer(hellos):
            return
        contents: dict[int, RecordDict] = {}
        for node, tenant in claims.items():
            hello = hellos.get(tenant, "no hello")
            try:
                if isinstance(hello, str):
                    raise ProtocolError(f"dealer: {hello}")
                self.cloud.bind_dealer(hello.dealer_public)
                contents[node] = pack_hello(hello)
            except ProtocolError as exc:
                log(WARNING, "node %d (%s): secure set-up failed: %s", node, tenant, exc)
        replies = self.exchange(grid, MessageType.SECURE_SETUP, contents, 0, Exchange(), set(contents))
        registrations: dict[int, DealerRegistration] = {}
        for node, content in replies.items():
            try:
                setup = unpack_setup(content)
                if setup.tenant != claims[node]:
                    raise ProtocolError(f"set up as tenant {setup.tenant!r} after claiming {claims[node]!r}")
                registrations[node] = self.cloud.register(setup)
            except ProtocolError as exc:
                log(WARNING, "node %d: secure set-up failed: %s", node, exc)
        outcome = self.dealer.register(grid, list(registrations.values())) if registrations else {}
        for node, registration in registrations.items():
            error = outcome.get(registration.tenant, "no answer from the dealer")
            if error:
                self.cloud.drop_tenant(registration.tenant)
                log(WARNING, "node %d: secure set-up failed at the dealer: %s", node, error)
                continue
            self.tenant_of[node] = registration.tenant
            log(INFO, "node %d: tenant %s set up (%s label protection)", node, registration.tenant,
                self.cloud.tenants[registration.tenant].setup.label_protection)


    def _impostor_dealer(self, hellos: dict[str, DealerHello | str]) -> bool:
        """With ``expected-dealer-key``: a dealer node whose hellos do not verify under it is
        refused (and the next node claiming the role is tried), before any tenant sees them."""
        if not isinstance(self.dealer, NodeDealer) or self.dealer.pinned is None or self.dealer.node is None:
            return False
        for tenant, hello in hellos.items():
            if isinstance(hello, str):
                continue
            try:
                verify_hello(self.dealer.pinned, hello, tenant)
            except ProtocolError as exc:
                node, self.dealer.node = self.dealer.node, None
                self.dealer_nodes.discard(node)
                self.refused[node] = f"its hellos do not verify under expected-dealer-key ({exc})"
                log(WARNING, "dealer node %d refused: %s", node, self.refused[node])
                return True
        return False


MAX_TENANT_ID = 128
QUERY_TIMEOUT = 30.0  # seconds: the most a role query or a dealer claimant's hello waits
PARK_FIRST, PARK_MAX = 60.0, 900.0  # seconds: a silent node's first back-off, and its cap


def _role(content: RecordDict) -> tuple[str, str, bytes]:
    record = read_record(content, RecordKey.ROLE, ConfigRecord)
    role, tenant = typed_value(record, "role", str, RecordKey.ROLE), typed_value(record, "tenant", str, RecordKey.ROLE)
    identity = typed_value(record, "identity", bytes, RecordKey.ROLE) if "identity" in record else b""
    if role not in ROLES or (role == TENANT_ROLE and not tenant):
        raise ProtocolError(f"role {role!r} / tenant {tenant!r:.64}")
    if len(tenant) > MAX_TENANT_ID or not tenant.isprintable():
        raise ProtocolError(f"tenant id: at most {MAX_TENANT_ID} printable characters")
    return role, tenant, identity
