"""The tenant worker: a long-lived process that runs the ClientApp's handlers for one node.

``flower-split worker --socket PATH`` on a tenant's (or the dealer's) machine, next to its
SuperNode started with node config ``worker-socket = "PATH"``. The per-message ClientApp that
Flower starts then only relays each message here (:mod:`flower_split.flower.worker_link`), so
torch, the model, the tokenized rows and the node's party state are loaded once and stay in
memory: the per-message floor of a deployment drops from tens of seconds to Flower's own
(process start of ``flwr-clientapp`` and the SuperNode's polling). docs/deployment.md §10.

What the worker holds is what ``context.state`` held before, per (run, node): a restarted
worker starts empty, and with node config ``state-dir`` the handlers reload the node's
mirror from disk exactly as a restarted SuperNode's do (:mod:`flower_split.flower.node_state`).

Trust: the socket is the node's own (file mode 0600, in a directory only its owner can
write; a connection from another user is closed unread), so only the SuperNode's processes of
the same user reach it. Requests are Flower protobufs, bounded in size before allocation; one
request is handled at a time, as the SuperNode sends them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common.serde import message_from_proto, message_to_proto, user_config_from_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

from flower_split.flower.channel_link import join, serve_channel
from flower_split.flower.contract import MessageType
from flower_split.flower.worker_link import (
    MAX_FRAME_BYTES, WORKER_ERROR_CODE, WorkerError, recv_frame, send_frame, version_tag,
)

LOG = logging.getLogger("flower_split.worker")
MAX_RUNS = 8  # states of this many (run, node) pairs are kept; one idle for IDLE_EVICT_S may make room
IDLE_EVICT_S = 3600.0
REQUEST_TIMEOUT_S = 120.0  # a relaying ClientApp sends its whole request at once
App = Callable[[Message, Context], Message]


class WorkerSetupError(RuntimeError):
    """The socket cannot be served safely (an unsafe directory, another live worker on it)."""


@dataclass(frozen=True)
class _Node:
    """Which node a message is for, and its configs (from the relaying ClientApp's context)."""

    key: tuple[int, int]  # (run id, node id)
    node_config: Mapping[str, Any]
    run_config: Mapping[str, Any]


class TenantWorker:
    """Handles request frames with ``app``, holding each (run, node)'s state between them."""

    def __init__(self, app: App, max_runs: int = MAX_RUNS, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if max_runs < 1:
            raise ValueError(f"max-runs: expected at least 1, got {max_runs}")
        self.app = app
        self.max_runs = max_runs
        self.max_frame_bytes = max_frame_bytes
        self.states: OrderedDict[tuple[int, int], RecordDict] = OrderedDict()
        self.last_used: dict[tuple[int, int], float] = {}
        self.handled = 0
        self.lock = threading.Lock()

    def handle_parts(self, parts: list[bytes]) -> bytes:
        """One request frame's parts -> the reply proto's bytes (never raises for a bad request
        whose message could be parsed: that is an error reply)."""
        if len(parts) not in (2, 3):
            raise WorkerError(f"request of {len(parts)} parts; expected 3 (version, message, context)")
        message_proto, context_proto = ProtoMessage(), ProtoContext()
        message_proto.ParseFromString(parts[-2])
        context_proto.ParseFromString(parts[-1])
        message = message_from_proto(message_proto)
        theirs = parts[0].decode(errors="replace") if len(parts) == 3 else "an older flower-split (frame 1: no version part)"
        if theirs != version_tag().decode():
            reason = (f"version mismatch: this run's code (the FAB's ClientApp) is {theirs}, the tenant worker "
                      f"runs {version_tag().decode()}; install the run's flower-split version on this machine and "
                      "restart `flower-split worker` (docs/deployment.md §6)")
            LOG.error("refused a message: %s", reason)
            return message_to_proto(Message(Error(code=WORKER_ERROR_CODE, reason=reason),
                                            reply_to=message)).SerializeToString()
        node = _Node((context_proto.run_id, context_proto.node_id), user_config_from_proto(context_proto.node_config),
                     user_config_from_proto(context_proto.run_config))
        if message.metadata.message_type == MessageType.CHANNEL_OPEN:
            reply = self.open_channel(message, node)
        else:
            reply = self.handle(message, node)
        return message_to_proto(reply).SerializeToString()

    def handle(self, message: Message, node: _Node) -> Message:
        """``message`` handled by the app with ``node``'s state (one message at a time)."""
        with self.lock:
            if node.key not in self.states and not self._make_room():
                return Message(Error(code=WORKER_ERROR_CODE, reason=f"the tenant worker holds {len(self.states)} "
                                     "runs in use (flower-split worker --max-runs); refusing another"),
                               reply_to=message)
            context = Context(run_id=node.key[0], node_id=node.key[1], node_config=node.node_config,
                              state=self.states.pop(node.key, None) or RecordDict(), run_config=node.run_config)
            started = time.perf_counter()
            try:
                reply = self.app(message, context)
            except Exception as exc:  # pylint: disable=broad-exception-caught  # the ClientApp's own contract
                LOG.exception("%s failed", message.metadata.message_type)
                reply = Message(Error(code=WORKER_ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=message)
            self.states[node.key] = context.state
            self.last_used[node.key] = time.monotonic()
            self.handled += 1
            LOG.info("message %d (%s) handled in %.2f s", self.handled, message.metadata.message_type,
                     time.perf_counter() - started)
        return reply

    def _make_room(self) -> bool:
        """Room for one more run: evict the least recently used one if it has been idle for
        IDLE_EVICT_S (logged; with ``state-dir`` it reloads from disk), else refuse."""
        if len(self.states) < self.max_runs:
            return True
        oldest = next(iter(self.states))
        if time.monotonic() - self.last_used.get(oldest, 0.0) < IDLE_EVICT_S:
            return False
        LOG.warning("evicting the state of run %d, node %d (idle for over %.0f s)", *oldest, IDLE_EVICT_S)
        del self.states[oldest]
        self.last_used.pop(oldest, None)
        return True

    def open_channel(self, message: Message, node: _Node) -> Message:
        """Join the cloud's direct channel (:mod:`flower_split.flower.channel_link`) and serve it
        in a thread with ``node``'s context; the reply tells the cloud over Flower."""
        try:
            conn = join(message)
        except (OSError, WorkerError) as exc:
            return Message(Error(code=WORKER_ERROR_CODE, reason=f"direct channel not joined: {exc}"), reply_to=message)
        threading.Thread(target=serve_channel, args=(conn, lambda m: self.handle(m, node)), daemon=True,
                         name=f"channel-{node.key[1]}").start()
        LOG.info("joined the direct channel of run %d as node %d", *node.key)
        return Message(RecordDict(), reply_to=message)


    def serve_connection(self, conn: socket.socket) -> None:
        """One request and its reply on an accepted connection (from this user only)."""
        if not _same_user(conn):
            LOG.warning("refused a connection from another user")
            return
        try:
            reply = self.handle_parts(recv_frame(conn, max_parts=3, max_bytes=self.max_frame_bytes,
                                                 deadline=time.monotonic() + REQUEST_TIMEOUT_S))
        except Exception as exc:  # pylint: disable=broad-exception-caught  # a bad request, not a crash
            LOG.warning("refused a malformed request: %s: %s", type(exc).__name__, exc)
            return
        conn.settimeout(None)
        send_frame(conn, [reply])


def _same_user(conn: socket.socket) -> bool:
    creds = struct.Struct("3i")
    _, uid, _ = creds.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
    return uid == os.getuid()


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0600) in a directory only this user can write;
    a stale socket file is replaced, a live worker's is refused."""
    directory = path.parent.resolve()
    if not directory.is_dir():
        raise WorkerSetupError(f"{directory}: no such directory for the worker socket")
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise WorkerSetupError(f"{directory}: the socket's directory must be owned by this user and not writable by "
                               "others (e.g. mkdir -m 700)")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise WorkerSetupError(f"{path} exists and is not a socket")
        if _live(path):
            raise WorkerSetupError(f"{path}: another worker is listening there")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def _live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def serve(path: Path, worker: TenantWorker, stop: threading.Event | None = None) -> None:
    """Serve ``worker`` on ``path`` until ``stop`` is set (or SIGTERM/SIGINT in the main thread);
    the socket file is removed on the way out."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    listener = bind_socket(path)
    listener.settimeout(0.2)
    LOG.info("tenant worker listening on %s", path)
    try:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, InterruptedError):
                continue
            with conn:
                conn.settimeout(None)
                try:
                    worker.serve_connection(conn)
                except OSError as exc:  # the relaying ClientApp went away: its SuperNode retries
                    LOG.warning("reply not delivered: %s", exc)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def run_worker(path: str, max_runs: int = MAX_RUNS) -> int:
    """``flower-split worker``: serve this machine's node (tenant or dealer) on socket ``path``.

    Every reply carries the cost meter's record (:func:`flower_split.flower.metering.cost_mod`:
    the worker's CPU seconds and peak memory per message), which the ServerApp's metered grid
    takes off and reports as the tenant's client CPU in results.json.
    """
    from flower_split.apps.client_app import make_client_app
    from flower_split.flower.metering import cost_mod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    worker = TenantWorker(make_client_app(mods=[cost_mod()]), max_runs=max_runs)
    try:
        serve(Path(path), worker)
    except WorkerSetupError as exc:
        LOG.error("%s", exc)
        return 2
    return 0
