"""The tenant worker's end of the direct channel (:mod:`flower_split.flower.direct_channel`).

``query.channel_open`` reaches the worker through Flower (so from the cloud Flower
authenticated, carrying what only that run's ServerApp can know): :func:`join` connects to
the address it names, accepts only the certificate whose SHA-256 it names, presents the
single-use token and waits for the cloud's acknowledgement; :func:`serve_channel` then
answers the cloud's messages on that connection until it closes. Each message is handled by
the worker exactly as one relayed by Flower (same lock, same state, same handlers).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Callable

from flwr.app import ConfigRecord, Message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from google.protobuf.message import DecodeError

from flower_split.flower.direct_channel import ACK, CHANNEL_RECORD, HANDSHAKE_TIMEOUT, HELLO
from flower_split.flower.worker_link import MAX_FRAME_BYTES, WorkerError, recv_frame, send_frame
from flower_split.transport.pinned_tls import connect_pinned

LOG = logging.getLogger("flower_split.worker")


def join(message: Message) -> ssl.SSLSocket:
    """Connect to the channel ``message`` (a ``query.channel_open``) invites this node to."""
    record = message.content.get(CHANNEL_RECORD)
    if not isinstance(record, ConfigRecord):
        raise WorkerError(f"{message.metadata.message_type}: no {CHANNEL_RECORD!r} record")
    host, port, fingerprint, token = (record.get(k) for k in ("host", "port", "fingerprint", "token"))
    if not (isinstance(host, str) and isinstance(port, int) and 0 < port < 65536 and isinstance(fingerprint, str)
            and len(fingerprint) == 64 and isinstance(token, bytes) and len(token) == 32):
        raise WorkerError("channel invitation: expected host, port, a 64-hex-digit fingerprint and a 32-byte token")
    conn = connect_pinned(host, port, fingerprint, HANDSHAKE_TIMEOUT)
    try:
        send_frame(conn, [HELLO, token])
        if recv_frame(conn, max_parts=1, max_bytes=16) != [ACK]:
            raise WorkerError("the cloud did not acknowledge the token")
    except BaseException:
        conn.close()
        raise
    conn.settimeout(None)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a cloud that vanishes is noticed
    return conn


def serve_channel(conn: ssl.SSLSocket, handle: Callable[[Message], Message], max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Answer the cloud's messages on ``conn`` with ``handle`` until the cloud closes it."""
    with conn:
        while True:
            try:
                (data,) = recv_frame(conn, max_parts=1, max_bytes=max_bytes)
                proto = ProtoMessage()
                proto.ParseFromString(data)
                message = message_from_proto(proto)
            except (OSError, DecodeError, WorkerError) as exc:
                LOG.info("direct channel closed: %s", exc)
                return
            try:
                send_frame(conn, [message_to_proto(handle(message)).SerializeToString()])
            except OSError as exc:
                LOG.warning("direct channel: reply not delivered: %s", exc)
                return
