"""The direct channel (issue 16): after one bootstrap over Flower, a node's messages travel over
TLS between the cloud and its tenant worker; a node without a worker stays on Flower; a token
is single-use and names one node; a certificate that is not the pinned one is refused."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app, route
from flower_split.apps.tenant_worker import TenantWorker
from flower_split.flower import direct_channel
from flower_split.config import ConfigError
from flower_split.flower.contract import MessageType
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.direct_channel import (
    ACK, CHANNEL_RECORD, HELLO, LOST, OPEN, REFUSED, ChannelGrid, ChannelServer,
)
from flower_split.flower.channel_link import join
from flower_split.flower.strategy_utils import RoundReport
from flower_split.flower.worker_link import WORKER_SOCKET, WorkerError, recv_frame, send_frame
from flower_split.transport.pinned_tls import PinError, connect_pinned
from test_secure_flower import SECURE, _strategy
from test_tenant_worker import _serving


class CountingApp:
    """The ClientApp Flower would run, counting what it is handed (what did not take the channel)."""

    def __init__(self) -> None:
        self.types: list[str] = []

    def __call__(self, message: Message, context: Context) -> Message:
        self.types.append(message.metadata.message_type)
        return route(message, context)


def test_a_secure_run_takes_the_channel_after_one_bootstrap_per_node(task_identity: None, tmp_path: Path,
                                                                      socket_dir: Path) -> None:
    path = socket_dir / "w.sock"
    with _serving(path, TenantWorker(make_client_app({**SECURE, "label-protection": "client"}))) as worker:
        flower = CountingApp()
        local = LocalGrid(flower, 2, dealer=tmp_path, node_config={WORKER_SOCKET: str(path)})
        grid = ChannelGrid(local, "127.0.0.1:0")
        try:
            reports: list = []
            _strategy().start(grid, 1, eval_every=1, eval_initial=False, on_report=reports.append)
        finally:
            grid.close()
        (round_,) = [r for r in reports if isinstance(r, RoundReport)]
        assert (round_.tenants, round_.steps, round_.dropped) == (["tenant-0", "tenant-1"], 4, {})
        assert flower.types.count(MessageType.CHANNEL_OPEN) == 3 and grid.status == {1: OPEN, 2: OPEN, 3: OPEN}
        # the bootstrap went first, at the first round trip: every protocol message took the channel
        assert sorted(set(flower.types)) == [MessageType.CHANNEL_OPEN]
        assert worker.handled > 40


def test_a_node_without_a_worker_stays_on_flower(task_identity: None, tmp_path: Path) -> None:
    flower = CountingApp()
    local = LocalGrid(_with_overrides(flower), 2, dealer=tmp_path)
    grid = ChannelGrid(local, "127.0.0.1:0")
    try:
        reports: list = []
        _strategy().start(grid, 1, eval_every=1, eval_initial=False, on_report=reports.append)
    finally:
        grid.close()
    assert grid.status == {1: REFUSED, 2: REFUSED, 3: REFUSED}
    (round_,) = [r for r in reports if isinstance(r, RoundReport)]
    assert round_.tenants == ["tenant-0", "tenant-1"] and MessageType.SECURE_TRAIN_BEGIN in flower.types


def _with_overrides(counting: CountingApp):
    app = make_client_app({**SECURE, "label-protection": "client"})

    def run(message: Message, context: Context) -> Message:
        counting.types.append(message.metadata.message_type)
        return app(message, context)

    return run


def _hello(server: ChannelServer, token: bytes, fingerprint: str | None = None) -> bytes:
    conn = connect_pinned(server.host, server.port, fingerprint or server.fingerprint, 5.0)
    with conn:
        send_frame(conn, [HELLO, token])
        try:
            return b"".join(recv_frame(conn, max_parts=1, max_bytes=16))
        except (WorkerError, OSError):
            return b""


def test_a_token_is_single_use_and_names_one_node() -> None:
    server = ChannelServer("127.0.0.1:0")
    try:
        token = server.invite(7)
        assert _hello(server, b"\x00" * 32) == b""  # a guessed token: closed
        assert _hello(server, token) == ACK and 7 in server.conns
        assert _hello(server, token) == b""  # replayed: closed, node 7 keeps its connection
        newer = server.invite(8)
        stale = server.invite(8)  # a newer invitation voids the older one
        assert _hello(server, newer) == b"" and _hello(server, stale) == ACK
        assert sorted(server.conns) == [7, 8]
    finally:
        server.close()


def test_the_worker_refuses_a_certificate_that_is_not_the_pinned_one(task_identity: None) -> None:
    server = ChannelServer("127.0.0.1:0")
    try:
        with pytest.raises(PinError):
            connect_pinned(server.host, server.port, hashlib.sha256(b"another").hexdigest(), 5.0)
        invitation = Message(RecordDict({CHANNEL_RECORD: ConfigRecord({
            "host": server.host, "port": server.port, "fingerprint": "0" * 64, "token": server.invite(1)})}),
            dst_node_id=1, message_type=MessageType.CHANNEL_OPEN)
        with pytest.raises(PinError):
            join(invitation)
        assert not server.conns
        bad = Message(RecordDict({CHANNEL_RECORD: ConfigRecord({"host": server.host, "port": server.port})}),
                      dst_node_id=1, message_type=MessageType.CHANNEL_OPEN)
        with pytest.raises(WorkerError, match="expected host, port"):
            join(bad)
    finally:
        server.close()


def test_plaintext_and_tls_1_2_clients_are_refused() -> None:
    server = ChannelServer("127.0.0.1:0")
    try:
        with socket.create_connection((server.host, server.port), timeout=5) as raw:  # no TLS: a frame in clear
            # the server may refuse and close before the client is done sending (a loaded machine):
            # ENOTCONN, EPIPE or a reset are that refusal too
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                raw.sendall(b"FSW1\x00\x00\x00\x02" + bytes(16) + HELLO)
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(4096):  # a TLS alert at most, then closed
                    pass
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection((server.host, server.port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw)
        assert not server.conns
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# a hostile review's findings (issue 16): one tenant must not stop or stall the others


class FakeWorker:
    """A worker joined to ``server`` as ``node`` that answers each request with ``answer(data)``."""

    def __init__(self, server: ChannelServer, node: int, answer) -> None:
        self.conn = connect_pinned(server.host, server.port, server.fingerprint, 5.0)
        token = server.invite(node)
        send_frame(self.conn, [HELLO, token])
        assert recv_frame(self.conn, max_parts=1, max_bytes=16) == [ACK]
        self.conn.settimeout(None)
        threading.Thread(target=self._serve, args=(answer,), daemon=True).start()

    def _serve(self, answer) -> None:
        try:
            while True:
                (data,) = recv_frame(self.conn, max_parts=1)
                answer(self.conn, data)
        except (OSError, WorkerError):
            return


def _echo(conn, data: bytes) -> None:
    proto = ProtoMessage()
    proto.ParseFromString(data)
    request = message_from_proto(proto)
    send_frame(conn, [message_to_proto(Message(RecordDict({"echo": ConfigRecord(
        {"n": int(request.content["config"]["n"])})}), reply_to=request)).SerializeToString()])


def _grid_with(workers: dict[int, object]) -> ChannelGrid:
    grid = ChannelGrid(LocalGrid(lambda m, c: None, 0), "127.0.0.1:0")
    for node, answer in workers.items():
        FakeWorker(grid.server, node, answer)
        grid.status[node] = OPEN
    return grid


def _request(node: int, n: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"n": n})}), dst_node_id=node, message_type=MessageType.TAIL)


def test_a_malformed_or_mistyped_reply_loses_that_node_only(task_identity: None) -> None:
    def garbage(conn, data: bytes) -> None:
        send_frame(conn, [message_to_proto(Message(RecordDict(), dst_node_id=0, message_type="query.role"))
                          .SerializeToString()])  # a valid protobuf, not a reply to the request

    grid = _grid_with({1: _echo, 2: garbage, 3: lambda conn, data: send_frame(conn, [b"\x08\x01" * 7])})
    try:
        replies = list(grid.send_and_receive([_request(n, n) for n in (1, 2, 3)], timeout=10.0))
        assert [(r.metadata.src_node_id, int(r.content["echo"]["n"])) for r in replies] == [(1, 1)]
        assert grid.status == {1: OPEN, 2: LOST, 3: LOST} and sorted(grid.server.conns) == [1]
    finally:
        grid.close()


def test_streamed_messages_travel_over_the_channels_and_a_broken_one_gives_an_error_reply(task_identity: None) -> None:
    """``push_messages`` / ``pull_messages`` (the secure strategy's streamed steps): replies come
    back over each node's channel as replies to the pushed messages; a node whose channel breaks
    gets an error reply at once and is lost, the others are not."""
    grid = _grid_with({1: _echo, 2: lambda conn, data: conn.close()})
    try:
        grid.timeout = 10.0
        messages = [_request(1, 7), _request(2, 8)]
        ids = list(grid.push_messages(messages))
        assert ids == [m.metadata.message_id for m in messages]
        replies: list[Message] = []
        deadline = time.monotonic() + 10.0
        while len(replies) < 2 and time.monotonic() < deadline:
            replies += grid.pull_messages([i for i in ids if i not in {r.metadata.reply_to_message_id for r in replies}])
            time.sleep(0.01)
        by_node = {r.metadata.src_node_id: r for r in replies}
        assert by_node[1].metadata.reply_to_message_id == ids[0] and int(by_node[1].content["echo"]["n"]) == 7
        assert by_node[2].has_error() and "channel lost" in by_node[2].error.reason
        assert grid.status == {1: OPEN, 2: LOST} and list(grid.pull_messages(ids)) == []
    finally:
        grid.close()


def test_a_trickling_tenant_cannot_stretch_the_reply_timeout(task_identity: None) -> None:
    def trickle(conn, data: bytes) -> None:
        for _ in range(40):
            conn.sendall(b"F")
            time.sleep(0.2)

    grid = _grid_with({1: _echo, 2: trickle})
    try:
        started = time.monotonic()
        replies = list(grid.send_and_receive([_request(1, 1), _request(2, 2)], timeout=1.5))
        assert time.monotonic() - started < 3.0
        assert [r.metadata.src_node_id for r in replies] == [1] and grid.status[2] == LOST
    finally:
        grid.close()


def test_two_messages_to_one_node_in_one_call_are_answered_in_order(task_identity: None) -> None:
    grid = _grid_with({1: _echo})
    try:
        for _ in range(5):
            replies = list(grid.send_and_receive([_request(1, 10), _request(1, 11)], timeout=10.0))
            assert sorted(int(r.content["echo"]["n"]) for r in replies) == [10, 11]
            assert all(int(r.content["echo"]["n"]) in (10, 11) for r in replies) and grid.status == {1: OPEN}
    finally:
        grid.close()


def test_idle_connections_are_closed_by_the_handshake_deadline_and_the_listener_goes_on(monkeypatch) -> None:
    monkeypatch.setattr(direct_channel, "HANDSHAKE_TIMEOUT", 0.5)
    server = ChannelServer("127.0.0.1:0")
    try:
        idle = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(40)]
        time.sleep(1.5)  # every idle one past its deadline: the slots are free again
        assert _hello(server, server.invite(4)) == ACK
        for sock in idle:
            sock.close()
    finally:
        server.close()


def test_a_wildcard_channel_address_is_refused_unless_another_is_advertised() -> None:
    for address in ("0.0.0.0:9300", "[::]:9300", "9300", "host:port"):
        with pytest.raises(ValueError, match="channel-address"):
            ChannelServer(address)
    for advertise in ("0.0.0.0:9300", "[::]:9300", "9300", "host:port", "host:0"):
        with pytest.raises(ValueError, match="channel-advertise"):
            ChannelServer("127.0.0.1:0", advertise)
    server = ChannelServer("0.0.0.0:0", "cloud.example:9300")  # a wildcard listener is fine when advertised
    assert (server.host, server.public_host, server.public_port) == ("0.0.0.0", "cloud.example", 9300)
    server.close()
    with pytest.raises(ConfigError, match="set channel-address too"):
        settings_from_run_config({"channel-advertise": "cloud.example:9300"})


def _forward(listener: socket.socket, target: tuple[str, int]) -> None:
    """A NAT stand-in: every connection to ``listener`` is piped to ``target``."""
    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with src, dst:
            while data := src.recv(1 << 16):
                dst.sendall(data)

    while True:
        try:
            outside, _ = listener.accept()
        except OSError:
            return
        inside = socket.create_connection(target)
        for a, b in ((outside, inside), (inside, outside)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def test_workers_join_at_the_advertised_address_not_the_bind_address(task_identity: None,
                                                                      socket_dir: Path) -> None:
    """Run config ``channel-advertise``: the ServerApp listens on one address, the invitation
    names another (here a forwarder, as a NAT or a container's published port would be), and
    the worker reaches the channel through it."""
    nat = socket.create_server(("127.0.0.1", 0))
    path = socket_dir / "w.sock"
    echo = lambda m, c: Message(RecordDict({"echo": ConfigRecord({"n": 1})}), reply_to=m)  # noqa: E731
    with nat, _serving(path, TenantWorker(echo)) as worker:
        flower = CountingApp()
        grid = ChannelGrid(LocalGrid(flower, 1, node_config={WORKER_SOCKET: str(path)}), "127.0.0.1:0",
                           f"localhost:{nat.getsockname()[1]}")
        try:
            assert (grid.server.public_host, grid.server.public_port) == ("localhost", nat.getsockname()[1])
            threading.Thread(target=_forward, args=(nat, (grid.server.host, grid.server.port)), daemon=True).start()
            (reply,) = grid.send_and_receive([_request(1, 1)], timeout=30)
        finally:
            grid.close()
        assert int(reply.content["echo"]["n"]) == 1 and grid.status == {1: OPEN}
        assert flower.types == [MessageType.CHANNEL_OPEN]  # the request itself took the channel
        assert worker.handled == 1


def test_a_refused_node_cannot_join_later_with_its_invitation(task_identity: None) -> None:
    server = ChannelServer("127.0.0.1:0")
    try:
        token = server.invite(5)
        server.cancel(5)
        assert _hello(server, token) == b"" and not server.conns
    finally:
        server.close()
