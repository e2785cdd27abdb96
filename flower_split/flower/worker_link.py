"""The tenant worker's wire: one request and one reply per Flower message over a Unix socket.

In a deployment Flower starts a fresh ClientApp process for every message (flwr 1.41's
SuperNode launches ``flwr-clientapp`` per task). Importing torch and transformers, loading the
model and tokenizing the tenant's rows again in every one of them cost 17-80 s per message
on the 2-core VM (issue 16). A *tenant worker* (:mod:`flower_split.apps.tenant_worker`,
``flower-split worker --socket PATH``) is a long-lived process on the tenant's machine that
holds all of that in memory; with node config ``worker-socket = "PATH"`` the per-message
ClientApp only hands the message to it (:func:`forward`) and relays the reply. Flower stays
the control plane (membership, authentication, TLS, rounds); nothing crosses the machine
boundary that did not before.

This module is imported by that per-message process, so it imports Flower and the standard
library only. Frames are Flower's own protobuf messages (never pickle: a frame is data, not
code), length-prefixed and bounded before anything is allocated:

``request``  ``MAGIC``, then three parts: :func:`version_tag` (the flower-split version and
             frame version of the run's code, which the worker checks against its own: the
             worker runs the installed package, the router the FAB's copy), the ``Message``
             proto, the ``Context`` proto (its ``state`` empty: the worker holds the node's
             state, Flower's copy stays empty); frame version 1 had no version part
``reply``    ``MAGIC``, then one part: the reply ``Message`` proto (content or error)
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common.serde import context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

from flower_split import __version__

WORKER_SOCKET = "worker-socket"    # node config: the worker's Unix socket path
WORKER_TIMEOUT = "worker-timeout"  # node config: seconds to wait for one reply
DEFAULT_TIMEOUT = 3600.0
MAGIC = b"FSW1"
FRAME_VERSION = 2                  # the request frame's layout (module doc)
MAX_FRAME_BYTES = 1 << 31          # Flower's own limit on a message (2 GiB)
WORKER_ERROR_CODE = 2              # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_COUNT = struct.Struct(">4sI")
_LENGTH = struct.Struct(">Q")


class WorkerError(RuntimeError):
    """The worker is unreachable, or a frame is malformed or too large."""


def send_frame(sock: socket.socket, parts: list[bytes]) -> None:
    """Write ``parts`` as one frame: magic, part count, each part's length, the parts."""
    header = _COUNT.pack(MAGIC, len(parts)) + b"".join(_LENGTH.pack(len(part)) for part in parts)
    sock.sendall(header)
    for part in parts:
        sock.sendall(part)


def recv_frame(sock: socket.socket, max_parts: int, max_bytes: int = MAX_FRAME_BYTES,
               deadline: float | None = None) -> list[bytes]:
    """Read one frame of at most ``max_parts`` parts and ``max_bytes`` bytes in all; checked
    against both bounds before any part is read. ``deadline`` (``time.monotonic()``) bounds
    the whole frame, however slowly the peer trickles it."""
    magic, count = _COUNT.unpack(_read(sock, _COUNT.size, deadline))
    if magic != MAGIC:
        raise WorkerError(f"not a tenant-worker frame (magic {magic!r})")
    if not 0 < count <= max_parts:
        raise WorkerError(f"frame of {count} parts; expected 1..{max_parts}")
    lengths = [_LENGTH.unpack(_read(sock, _LENGTH.size, deadline))[0] for _ in range(count)]
    if sum(lengths) > max_bytes:
        raise WorkerError(f"frame of {sum(lengths)} bytes exceeds the limit of {max_bytes}")
    return [_read(sock, length, deadline) for length in lengths]


def _read(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    buffer, view, done = bytearray(size), None, 0
    view = memoryview(buffer)
    while done < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"frame not complete by its deadline ({done} of {size} bytes)")
            sock.settimeout(left)
        got = sock.recv_into(view[done:], min(size - done, 1 << 22))
        if not got:
            raise WorkerError(f"connection closed with {size - done} of {size} bytes unread")
        done += got
    return bytes(buffer)


def version_tag() -> bytes:
    """This code's flower-split version and frame version, as the first part of a request."""
    return f"flower-split {__version__} (frame {FRAME_VERSION})".encode()


def request_parts(message: Message, context: Context) -> list[bytes]:
    """The request frame of ``message``: the version tag, its proto and the context's proto
    without its state."""
    bare = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=RecordDict(), run_config=context.run_config)
    return [version_tag(), message_to_proto(message).SerializeToString(), context_to_proto(bare).SerializeToString()]


def forward(message: Message, context: Context) -> Message:
    """Hand ``message`` to the worker named by node config ``worker-socket``; its reply, made a
    reply to ``message`` here. An unreachable worker is an error reply that says how to start it."""
    path = str(context.node_config[WORKER_SOCKET])
    timeout = _timeout(context.node_config.get(WORKER_TIMEOUT, DEFAULT_TIMEOUT))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            send_frame(sock, request_parts(message, context))
            (reply_bytes,) = recv_frame(sock, max_parts=1)
    except (OSError, WorkerError) as exc:
        reason = (f"WorkerError: tenant worker at {path} (node config {WORKER_SOCKET}) did not answer: "
                  f"{type(exc).__name__}: {exc}; start it on this machine with `flower-split worker --socket {path}` "
                  f"(a worker of an older frame version closes this run's requests unanswered; this run's code: "
                  f"{version_tag().decode()})")
        return Message(Error(code=WORKER_ERROR_CODE, reason=reason), reply_to=message)
    return as_reply(reply_bytes, message)


def as_reply(reply_bytes: bytes, message: Message) -> Message:
    """The worker's reply proto as a reply to ``message`` (content or error; its metadata is ours)."""
    proto = ProtoMessage()
    proto.ParseFromString(reply_bytes)
    reply = message_from_proto(proto)
    if reply.has_error():
        return Message(reply.error, reply_to=message)
    return Message(reply.content, reply_to=message)


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"node config {WORKER_TIMEOUT}: expected seconds > 0, got {value!r}")
    return float(value)
