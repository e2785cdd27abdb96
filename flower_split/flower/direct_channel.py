"""The direct channel: the cloud talks to tenant workers over TLS, Flower stays the control plane.

Flower 1.41 delivers a message in a deployment by polling (the ServerApp's grid every 3 s,
the SuperNode every 3 s when idle) and a fresh ``flwr-clientapp`` process per message: about
10 s per protocol round trip on localhost even when a tenant worker does the work in 0.1 s
(docs/deployment.md §10). With run config ``channel-address = "HOST:PORT"`` the ServerApp
listens there (:class:`ChannelServer`; run config ``channel-advertise = "HOST:PORT"`` is the
address the tenants are told instead, when they reach the listener by another one: NAT, a
container's published port; default: the listening address) and :class:`ChannelGrid` moves the protocol's
messages to each node that joins, over one TLS connection per node:

1. **Bootstrap over Flower.** Once per node, a ``query.channel_open`` message through
   Flower's authenticated path (TLS, SuperNode authentication) carries the channel's
   address, the SHA-256 of the ServerApp's throw-away certificate
   (:mod:`flower_split.transport.pinned_tls`) and a fresh 32-byte token for that node only.
2. The node's tenant worker connects, pins the certificate, sends the token
   (:mod:`flower_split.flower.channel_link`); the token is single-use and names the node, so
   the connection speaks for exactly the node Flower authenticated. Then it replies to (1).
3. **Stage messages over the channel**: a Flower ``Message`` protobuf each way, one request
   and one reply at a time per node, all nodes in parallel. A reply is rebuilt here as a
   reply to the request (its sender is the channel's node, whatever the worker wrote).

A node without a worker (the bootstrap fails) stays on Flower for the run; a channel that
breaks or times out drops that node from the round trip, as a silent Flower node would be,
and the node is offered a new channel once it answers over Flower again. Nothing new
reaches the cloud: the channel carries the same messages Flower would.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import socket
import ssl
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Iterable
from uuid import uuid4

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.common.logger import log
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid

from flower_split.flower.contract import MessageType
from flower_split.flower.grid_delegate import DelegatingGrid
from flower_split.flower.stream import MIN_PAUSE, poll_pause
from flower_split.flower.worker_link import MAX_FRAME_BYTES, WorkerError, recv_frame, send_frame
from flower_split.transport.pinned_tls import server_context

HELLO, ACK = b"hello", b"ok"
CHANNEL_RECORD = "channel"  # ConfigRecord of query.channel_open: host, port, fingerprint, token
HANDSHAKE_TIMEOUT = 10.0  # one deadline for TLS handshake and token, per connection
MAX_ADMITTING = 16        # connections in their handshake at once; more are closed at once
OPEN, REFUSED, LOST = "open", "refused", "lost"
CHANNEL_LOST = 4  # the error code of a streamed message whose channel broke: Flower's "reply expired"
ABANDONED_S = 60.0  # a pushed message's reply is dropped this long after its deadline if never pulled


def parse_address(address: str, key: str = "channel-address", wildcard_ok: bool = False) -> tuple[str, int]:
    """``"HOST:PORT"`` (``[V6]:PORT`` for IPv6) -> (host, port) for run config ``key``; port 0
    (``channel-address`` only) asks the system for a free one. A wildcard host is refused
    unless ``wildcard_ok`` (a listening address with ``channel-advertise``): the tenants are
    told the address, and a wildcard reaches nobody."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    lowest = 0 if key == "channel-address" else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError(f"{key}: expected HOST:PORT (port {lowest}..65535), got {address!r}")
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard and not wildcard_ok:
        raise ValueError(f"{key} {address!r}: name the address the tenants reach (it is sent to them), "
                         "not a wildcard")
    return host, int(port)


class ChannelServer:
    """The ServerApp's TLS listener: admits a connection only with a pending node's token.
    ``advertise`` (``HOST:PORT``) is the address invitations name; default: the listener's
    (then ``address`` may not be a wildcard; with ``advertise`` it may, e.g. in a container)."""

    def __init__(self, address: str, advertise: str = "") -> None:
        host, port = parse_address(address, wildcard_ok=bool(advertise))
        public = parse_address(advertise, "channel-advertise") if advertise else None
        self.context, self.fingerprint = server_context()
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.listener = socket.create_server((host, port), family=family)
        self.host, self.port = host, self.listener.getsockname()[1]
        self.public_host, self.public_port = public or (self.host, self.port)
        self.admitting = threading.BoundedSemaphore(MAX_ADMITTING)
        self.pending: dict[bytes, int] = {}  # SHA-256 of a token -> node id
        self.conns: dict[int, ssl.SSLSocket] = {}
        self.joined = threading.Condition()
        self.closed = threading.Event()
        threading.Thread(target=self._accept, name="channel-accept", daemon=True).start()

    def invite(self, node: int) -> bytes:
        """A fresh single-use token for ``node`` (its earlier ones are void)."""
        token = secrets.token_bytes(32)
        with self.joined:
            self.pending = {k: v for k, v in self.pending.items() if v != node}
            self.pending[hashlib.sha256(token).digest()] = node
        return token

    def cancel(self, node: int) -> None:
        """Void ``node``'s pending invitation (it stays on Flower)."""
        with self.joined:
            self.pending = {k: v for k, v in self.pending.items() if v != node}

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:  # out of file descriptors, an aborted connection: go on listening
                if self.closed.wait(0.1):
                    return
                continue
            if not self.admitting.acquire(blocking=False):
                raw.close()  # too many handshakes in progress: an invited worker retries on its next invitation
                continue
            threading.Thread(target=self._admit, args=(raw,), daemon=True).start()

    def _admit(self, raw: socket.socket) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            conn = self.context.wrap_socket(raw, server_side=True)
            kind, token = recv_frame(conn, max_parts=2, max_bytes=256, deadline=deadline)
            with self.joined:
                node = self.pending.pop(hashlib.sha256(token).digest(), None) if kind == HELLO else None
                if node is None:
                    raise WorkerError("unknown or used token")
                send_frame(conn, [ACK])
                old = self.conns.pop(node, None)
                self.conns[node] = conn
                self.joined.notify_all()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if old is not None:
                old.close()
        except (OSError, ValueError, WorkerError) as exc:  # ValueError: a frame of other than two parts
            log(30, "direct channel: refused a connection: %s", exc)
            raw.close()
        finally:
            self.admitting.release()

    def drop(self, node: int) -> None:
        with self.joined:
            conn = self.conns.pop(node, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        with self.joined:
            for conn in self.conns.values():
                conn.close()
            self.conns.clear()


class ChannelGrid(DelegatingGrid):
    """A Grid that sends each message over its node's direct channel when it has one (module doc)."""

    poll_pause = MIN_PAUSE  # its own replies are in memory; Flower's are pulled at the wrapped grid's pace

    def __init__(self, grid: Grid, address: str, advertise: str = "") -> None:
        super().__init__(grid)
        self.server = ChannelServer(address, advertise)
        self.status: dict[int, str] = {}
        self.locks: dict[int, threading.Lock] = {}
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="channel")
        self.timeout: float | None = None  # the last send_and_receive's: a pushed message's deadline
        self._pushed: dict[str, tuple[Message, Future, float]] = {}  # over a channel, by id: (message, reply, pushed at)
        self._pulled_flower = 0.0  # when the wrapped grid was last pulled (no faster than its poll_pause)
        log(20, "direct channel listening on %s:%d, advertised as %s:%d (certificate SHA-256 %s)",
            self.server.host, self.server.port, self.server.public_host, self.server.public_port,
            self.server.fingerprint)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.timeout = timeout
        self._bootstrap({m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.status},
                        timeout)
        direct = [m for m in messages if self.status.get(m.metadata.dst_node_id) == OPEN]
        flower = [m for m in messages if self.status.get(m.metadata.dst_node_id) != OPEN]
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = {self.pool.submit(self._exchange, m, deadline): m for m in direct}
        replies = list(self._grid.send_and_receive(flower, timeout=timeout)) if flower else []
        for reply in replies:  # a node that lost its channel answers over Flower: offer it a new one
            if self.status.get(reply.metadata.src_node_id) == LOST and not reply.has_error():
                del self.status[reply.metadata.src_node_id]
        done, late = wait(futures, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        for future in late:  # past the reply timeout: drop the node, as Flower's grid does
            self._lose(futures[future].metadata.dst_node_id, "no reply within the reply timeout")
        return replies + [reply for reply in (f.result() for f in done) if reply is not None]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message over its node's channel when it has one (its reply waits for
        :meth:`pull_messages`; the whole reply is due within the last ``send_and_receive``
        timeout), over Flower otherwise. A node is offered a channel at its next ``send_and_receive``."""
        ids: list[str] = []
        flower = []
        now = time.monotonic()
        deadline = None if self.timeout is None else now + self.timeout
        for mid, (_, future, pushed) in list(self._pushed.items()):  # given up on by the caller long ago
            if deadline is not None and future.done() and now - pushed > self.timeout + ABANDONED_S:
                del self._pushed[mid]
        for message in messages:
            if self.status.get(message.metadata.dst_node_id) != OPEN:
                flower.append(message)
                continue
            mid = uuid4().hex
            message.metadata.__dict__["_message_id"] = mid
            self._pushed[mid] = (message, self.pool.submit(self._exchange, message, deadline), now)
            ids.append(mid)
        return ids + [mid for mid in self._grid.push_messages(flower) if mid] if flower else ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that arrived, over the channels and over Flower; a channel lost on the way
        gives an error reply at once (the node is dropped, as by a silent Flower node)."""
        replies: list[Message] = []
        flower = []
        for mid in message_ids:
            if mid not in self._pushed:
                flower.append(mid)
            elif self._pushed[mid][1].done():
                message, future, _ = self._pushed.pop(mid)
                reply = future.result()
                replies.append(reply if reply is not None else
                               Message(Error(code=CHANNEL_LOST, reason="direct channel lost"), reply_to=message))
        if flower and time.monotonic() - self._pulled_flower >= poll_pause(self._grid):
            self._pulled_flower = time.monotonic()
            for reply in self._grid.pull_messages(flower):
                if self.status.get(reply.metadata.src_node_id) == LOST and not reply.has_error():
                    del self.status[reply.metadata.src_node_id]  # back over Flower: offer a new channel
                replies.append(reply)
        return replies

    def _bootstrap(self, nodes: set[int], timeout: float | None) -> None:
        if not nodes:
            return
        invitations = [Message(RecordDict({CHANNEL_RECORD: ConfigRecord({
            "host": self.server.public_host, "port": self.server.public_port, "fingerprint": self.server.fingerprint,
            "token": self.server.invite(node)})}), dst_node_id=node, message_type=MessageType.CHANNEL_OPEN)
            for node in sorted(nodes)]
        answered = {r.metadata.src_node_id: r for r in self._grid.send_and_receive(invitations, timeout=timeout)}
        for node in nodes:
            reply = answered.get(node)
            joined = node in self.server.conns
            self.status[node] = OPEN if joined and reply is not None and not reply.has_error() else REFUSED
            if self.status[node] == REFUSED:
                self.server.cancel(node)
                self.server.drop(node)
                reason = reply.error.reason if reply is not None and reply.has_error() else "no reply"
                log(20, "direct channel: node %d stays on Flower (%s)", node, reason)

    def _exchange(self, message: Message, deadline: float | None) -> Message | None:
        """``message`` over its node's channel and the reply, or None (the node is then LOST).
        One request at a time per node; the whole reply must arrive by ``deadline``."""
        node = message.metadata.dst_node_id
        with self.locks.setdefault(node, threading.Lock()):
            conn = self.server.conns.get(node)
            try:
                if conn is None or self.status.get(node) != OPEN:
                    raise WorkerError("not connected")
                if deadline is not None:
                    conn.settimeout(max(0.001, deadline - time.monotonic()))
                send_frame(conn, [message_to_proto(message).SerializeToString()])
                (data,) = recv_frame(conn, max_parts=1, max_bytes=MAX_FRAME_BYTES, deadline=deadline)
                proto = ProtoMessage()
                proto.ParseFromString(data)
                reply = message_from_proto(proto)
                if reply.metadata.message_type != message.metadata.message_type:
                    raise WorkerError(f"reply of type {reply.metadata.message_type!r} to a "
                                      f"{message.metadata.message_type!r} message")
                return Message(reply.error if reply.has_error() else reply.content, reply_to=message)
            except Exception as exc:  # pylint: disable=broad-exception-caught  # any bad reply is that node's loss
                self._lose(node, f"{type(exc).__name__}: {exc}")
                return None

    def _lose(self, node: int, reason: str) -> None:
        if self.status.get(node) == OPEN:
            log(30, "direct channel: node %d lost (%s); it answers over Flower until it rejoins", node, reason)
            self.status[node] = LOST
        self.server.drop(node)

    def close(self) -> None:
        self.server.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
