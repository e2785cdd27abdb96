"""The tenant worker (issue 16's data plane): the per-message ClientApp relays to a long-lived
process over a Unix socket, and a whole secure run through it behaves as one without it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings, strategies as st
from flwr.app import ConfigRecord, Context, Message, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app, make_router, message_types, route
from flower_split.apps.tenant_worker import TenantWorker, WorkerSetupError, bind_socket, serve
from flower_split.flower.contract import MessageType
from flower_split.flower.strategy_utils import RoundReport
from flower_split import __version__
from flower_split.flower.worker_link import (
    MAGIC, WORKER_SOCKET, WorkerError, as_reply, recv_frame, request_parts, send_frame,
)
from test_secure_flower import SECURE, _model_weights, _strategy


@contextmanager
def _serving(path: Path, worker: TenantWorker) -> Iterator[TenantWorker]:
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(path, worker, stop), daemon=True)
    thread.start()
    while not path.exists():
        thread.join(0.01)
    try:
        yield worker
    finally:
        stop.set()
        thread.join(10)
    assert not path.exists(), "the worker leaves no socket file behind"


def test_the_router_handles_every_message_type_the_handlers_do_and_imports_no_torch() -> None:
    handled = set(make_client_app()._registered_funcs)  # pylint: disable=protected-access
    assert set(make_router()._registered_funcs) == handled == {t if "." in t else f"{t}.default" for t in message_types()}
    probe = ("import sys, flower_split.apps.client_app as a; a.make_router(); "
             "print(sorted(m for m in ('torch', 'transformers', 'tenseal') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", "the per-message process of a deployment must not import torch"


@pytest.mark.parametrize("mode", ["client"])
def test_a_secure_run_through_workers_equals_one_without(mode: str, task_identity: None, tmp_path: Path,
                                                         socket_dir: Path) -> None:
    """Every message of two secure rounds (set-up, dealer, steps, evaluation) goes through one
    worker serving all three nodes; Flower's context.state stays empty, the worker holds it."""
    config = {**SECURE, "label-protection": mode}
    path = socket_dir / "worker.sock"
    with _serving(path, TenantWorker(make_client_app(config))) as worker:
        grid = LocalGrid(route, 2, dealer=tmp_path, node_config={WORKER_SOCKET: str(path)})
        strategy, reports = _strategy(), []
        strategy.start(grid, 2, eval_every=1, eval_initial=False, on_report=reports.append)
        rounds = [r for r in reports if isinstance(r, RoundReport)]
        assert [(r.tenants, r.steps, r.round_trips, r.dropped) for r in rounds] == \
            [(["tenant-0", "tenant-1"], 4, 4 * 10 + 1, {})] * 2
        assert all(not len(context.state) for context in grid.contexts.values())
        assert sorted(node for _, node in worker.states) == [1, 2, 3] and worker.handled > 80
        for node in (1, 2):  # the worker's halves and the cloud's add up to a model that moved
            grid.contexts[node].state = worker.states[(1, node)]
            weights = _model_weights(grid, strategy, node)
            assert max(w.abs().max().item() for w in weights.values()) < 10.0
            assert weights["cls.bc"].abs().max() > 0


def _context(path: Path, node: int = 1) -> Context:
    return Context(run_id=1, node_id=node, node_config={WORKER_SOCKET: str(path), "partition-id": 0},
                   state=RecordDict(), run_config={})


def _message(kind: str = MessageType.ROLE) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type=kind)


def test_a_handler_error_is_an_error_reply_and_the_worker_goes_on(socket_dir: Path, task_identity: None) -> None:
    def app(message: Message, context: Context) -> Message:
        if message.content["config"]["x"] == 0:
            raise ValueError("bad value")
        context.state["seen"] = ConfigRecord({"n": int(context.state.get("seen", ConfigRecord({"n": 0}))["n"]) + 1})
        return Message(RecordDict({"ok": ConfigRecord({"n": context.state["seen"]["n"]})}), reply_to=message)

    path = socket_dir / "w.sock"
    with _serving(path, TenantWorker(app)) as worker:
        assert route(_message(), _context(path)).content["ok"]["n"] == 1
        bad = Message(RecordDict({"config": ConfigRecord({"x": 0})}), dst_node_id=1, message_type=MessageType.ROLE)
        reply = route(bad, _context(path))
        assert reply.has_error() and "ValueError: bad value" in reply.error.reason
        assert route(_message(), _context(path)).content["ok"]["n"] == 2  # state held across messages
        assert route(_message(), _context(path, node=2)).content["ok"]["n"] == 1  # another node's own state
        assert worker.handled == 4


def test_malformed_frames_are_refused_without_stopping_the_worker(socket_dir: Path, task_identity: None) -> None:
    path = socket_dir / "w.sock"
    with _serving(path, TenantWorker(lambda m, c: Message(RecordDict(), reply_to=m),
                                     max_frame_bytes=1 << 20)) as worker:
        for garbage in (b"XXXX\x00\x00\x00\x01", MAGIC + b"\x00\x00\x00\x03",
                        MAGIC + b"\x00\x00\x00\x01" + (1 << 40).to_bytes(8, "big"), MAGIC):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(10) == b""  # closed unanswered
        with socket.socket(socket.AF_UNIX) as sock:  # two parts that are not protobufs of the right kind
            sock.connect(str(path))
            send_frame(sock, [b"\xff" * 10, b"\x01"])
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
        assert not route(_message(), _context(path)).has_error() and worker.handled == 1


def test_a_worker_refuses_a_run_of_another_version_naming_both(socket_dir: Path, task_identity: None) -> None:
    """The worker runs the installed flower-split, the router the FAB's copy: a request from
    code of another flower-split or frame version (frame 1 had no version part) is an error
    reply naming both versions, handled by nothing; the worker goes on serving its own."""
    path = socket_dir / "w.sock"
    bare = request_parts(_message(), _context(path))[1:]
    with _serving(path, TenantWorker(lambda m, c: Message(RecordDict(), reply_to=m))) as worker:
        for parts, theirs in (([b"flower-split 9.9.9 (frame 2)", *bare], "flower-split 9.9.9 (frame 2)"),
                              (bare, "frame 1")):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                send_frame(sock, parts)
                reply = as_reply(recv_frame(sock, max_parts=1)[0], _message())
            assert reply.has_error() and "version mismatch" in reply.error.reason
            assert theirs in reply.error.reason and f"flower-split {__version__} (frame 2)" in reply.error.reason
        assert worker.handled == 0
        assert not route(_message(), _context(path)).has_error() and worker.handled == 1


def test_the_package_version_is_pyprojects() -> None:
    """``flower_split.__version__`` (what the worker compares) is the version pip installs."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert __version__ == pyproject["project"]["version"]


def test_an_unreachable_worker_is_an_error_reply_that_says_how_to_start_it(socket_dir: Path, task_identity: None) -> None:
    reply = route(_message(), _context(socket_dir / "absent.sock"))
    assert reply.has_error() and "flower-split worker --socket" in reply.error.reason


def test_the_socket_must_live_in_a_private_directory_and_one_worker_serves_it(tmp_path: Path,
                                                                             socket_dir: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    with pytest.raises(WorkerSetupError, match="not writable by others"):
        bind_socket(open_dir / "w.sock")
    path = socket_dir / "w.sock"
    (socket_dir / "file").write_text("x")
    with pytest.raises(WorkerSetupError, match="not a socket"):
        bind_socket(socket_dir / "file")
    with _serving(path, TenantWorker(lambda m, c: Message(RecordDict(), reply_to=m))) as _:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(WorkerSetupError, match="another worker"):
            bind_socket(path)
    stale = bind_socket(path)  # a worker that died leaves its socket file: the next one takes it over
    stale.close()
    bind_socket(path).close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_recv_frame_reads_any_bytes_into_a_frame_or_a_worker_error(data: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        try:
            parts = recv_frame(right, max_parts=2, max_bytes=1 << 16)
        except WorkerError:
            return
        assert 1 <= len(parts) <= 2 and sum(map(len, parts)) <= 1 << 16


def test_a_request_frame_carries_no_state_of_flowers_context(task_identity: None) -> None:
    context = _context(Path("/nonexistent"))
    context.state["secret"] = ConfigRecord({"k": b"\x01" * 32})
    parts = request_parts(_message(), context)
    assert b"\x01" * 32 not in b"".join(parts)


def test_a_live_run_is_never_evicted_for_another_and_an_idle_one_is(monkeypatch, task_identity: None) -> None:
    """More runs than --max-runs: a new one is refused while the others are in use (a silent
    fresh start of a live tenant would be worse); one idle past IDLE_EVICT_S makes room."""
    from flower_split.apps import tenant_worker

    def counter(message: Message, context: Context) -> Message:
        n = int(context.state["n"]["n"]) + 1 if "n" in context.state else 1
        context.state["n"] = ConfigRecord({"n": n})
        return Message(RecordDict({"ok": ConfigRecord({"n": n})}), reply_to=message)

    worker = TenantWorker(counter, max_runs=2)
    node = lambda run: tenant_worker._Node((run, 1), {}, {})  # noqa: E731
    assert int(worker.handle(_message(), node(1)).content["ok"]["n"]) == 1
    assert int(worker.handle(_message(), node(2)).content["ok"]["n"]) == 1
    refused = worker.handle(_message(), node(3))
    assert refused.has_error() and "refusing another" in refused.error.reason
    assert int(worker.handle(_message(), node(1)).content["ok"]["n"]) == 2  # run 1 kept its state
    monkeypatch.setattr(tenant_worker, "IDLE_EVICT_S", 0.0)
    assert int(worker.handle(_message(), node(3)).content["ok"]["n"]) == 1  # run 2 (least recent) made room
    assert sorted(worker.states) == [(1, 1), (3, 1)]
