"""Cost meters for Flower runs: bytes on the wire per node, client CPU time and peak memory.

Two halves, used together by ``flower-split simulate`` / ``compare`` for every strategy alike:

:func:`cost_mod` (a Flower client mod, wrapped around every ClientApp handler)
    measures the process CPU seconds (``time.process_time``, all threads of the client
    process) spent in the handler and the client process's peak resident set size
    (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), and attaches them to the reply as a
    :class:`MetricRecord` under :data:`COSTS_KEY`. One-off setup (loading the model, the data
    set and tokenizing the tenant's partition) runs in ``prepare`` before the clock starts and
    is reported separately as ``setup-cpu-seconds``.
:class:`MeteredGrid` (wraps the ServerApp's :class:`Grid`)
    counts the payload bytes of every message sent to and received from each node, and strips
    the :data:`COSTS_KEY` record from replies (accumulating it per node) before the strategy
    sees them, so strategies that insist on exactly one MetricRecord (Flower's ``FedAvg``) are
    unaffected. Over Flower's in-memory grid (a simulation) it polls for replies with
    :func:`~flower_split.flower.stream.gather` (every strategy alike).

Payload bytes are the serialized sizes of the arrays of every :class:`ArrayRecord`
(``len(Array.data)``: NumPy ``.npy`` bytes, including each array's ~128-byte header) plus every
``bytes`` value of a :class:`ConfigRecord` (where ciphertexts travel). Scalar config/metric
values and Flower's own framing (metadata, protobuf, gRPC) are not counted.

Peak memory caveat: in a Ray simulation a client runs inside a Ray actor process that may serve
several tenants one after the other, so ``ru_maxrss`` is the peak of that process (including
Python, torch, Flower and Ray's worker runtime), an upper bound on what one tenant needs; the
growth above the process's baseline at its first message is reported too.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from flower_split.flower.grid_delegate import DelegatingGrid
from flower_split.flower.stream import gather

COSTS_KEY = "client-costs"
# training after the federated rounds (personalisation), metered apart from the rounds' training
FINETUNE_TYPES = ("train.personalize",)


def record_bytes(content: RecordDict) -> int:
    """Bytes of arrays (ArrayRecords) and of ``bytes`` values (ConfigRecords) in ``content``."""
    total = 0
    for key, record in content.items():
        if key == COSTS_KEY:
            continue
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                if isinstance(value, bytes):
                    total += len(value)
                elif isinstance(value, list):
                    total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    """This process's resident set size now (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakRss:
    """The peak resident set size of this process over a ``with`` block, sampled every
    ``interval`` seconds on a daemon thread (Linux). ``ru_maxrss`` only grows, so it cannot tell
    one of several runs in one process (a comparison's simulations) from the others; where RSS
    cannot be sampled, :attr:`peak` is ``ru_maxrss`` at the end of the block."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            rss = current_rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRss":
        if current_rss_bytes() is not None:
            self._thread = threading.Thread(target=self._sample, name="flower-split-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, current_rss_bytes() or 0)
        else:
            self.peak = peak_rss_bytes()


def _torch_threads() -> int:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else 0


_BASELINE_RSS: list[int] = []  # this process's peak RSS when the first message arrived


def cost_mod(prepare: Callable[[Context], Any] | None = None) -> Callable[..., Message]:
    """A Flower mod measuring each handler's CPU seconds and the process's peak RSS.

    ``prepare(context)`` (e.g. load this tenant's data; should be cached) runs first, outside
    the measured time, and its CPU time is reported as ``setup-cpu-seconds``. The process's peak
    RSS before its first message (Python, torch, Flower and Ray already loaded) is its baseline;
    ``rss-above-baseline-bytes`` is the growth since then (the client's model, data, activations).
    """

    def mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if not _BASELINE_RSS:
            _BASELINE_RSS.append(peak_rss_bytes())
        setup = 0.0
        if prepare is not None:
            start = time.process_time()
            prepare(context)
            setup = time.process_time() - start
        start = time.process_time()
        reply = call_next(message, context)
        cpu = time.process_time() - start
        if reply.has_error():
            return reply
        partition = context.node_config.get("partition-id", -1)
        peak = peak_rss_bytes()
        reply.content[COSTS_KEY] = MetricRecord({
            "cpu-seconds": cpu,
            "setup-cpu-seconds": setup,
            "peak-rss-bytes": peak,
            "rss-above-baseline-bytes": peak - _BASELINE_RSS[0],
            "torch-threads": _torch_threads(),
            "partition-id": int(partition) if isinstance(partition, (int, float, str)) else -1,
            "pid": os.getpid(),
        })
        return reply

    return mod


@dataclass
class NodeCosts:
    """What one node sent, received and spent (since the last :meth:`MeteredGrid.take`)."""

    partition_id: int = -1
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    messages: int = 0
    train_cpu_seconds: float = 0.0
    eval_cpu_seconds: float = 0.0
    finetune_cpu_seconds: float = 0.0  # personalisation after the rounds (``train.personalize``)
    setup_cpu_seconds: float = 0.0
    peak_rss_bytes: int = 0
    rss_above_baseline_bytes: int = 0
    torch_threads: int = 0

    def add(self, other: "NodeCosts") -> None:
        if other.partition_id >= 0:
            self.partition_id = other.partition_id
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.messages += other.messages
        self.train_cpu_seconds += other.train_cpu_seconds
        self.eval_cpu_seconds += other.eval_cpu_seconds
        self.finetune_cpu_seconds += other.finetune_cpu_seconds
        self.setup_cpu_seconds += other.setup_cpu_seconds
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)
        self.rss_above_baseline_bytes = max(self.rss_above_baseline_bytes, other.rss_above_baseline_bytes)
        self.torch_threads = max(self.torch_threads, other.torch_threads)


@dataclass
class Traffic:
    """Costs per node over one phase, and the round trips of that phase."""

    nodes: dict[int, NodeCosts] = field(default_factory=dict)
    round_trips: int = 0
    dealer_nodes: set[int] = field(default_factory=set)  # secure mode's dealer: not a client

    def node(self, node_id: int) -> NodeCosts:
        return self.nodes.setdefault(node_id, NodeCosts())

    def per_client(self, name: str) -> float:
        """Mean of ``name`` over the tenant nodes that exchanged messages in this phase."""
        active = [c for n, c in self.nodes.items() if c.messages and n not in self.dealer_nodes]
        return sum(getattr(c, name) for c in active) / len(active) if active else 0.0

    def dealer(self, name: str) -> float:
        """Total of ``name`` over the dealer node(s) in this phase."""
        return sum(getattr(c, name) for n, c in self.nodes.items() if n in self.dealer_nodes)


class MeteredGrid(DelegatingGrid):
    """A :class:`Grid` that meters every message it sends and every reply (``send_and_receive``,
    ``push_messages`` / ``pull_messages``) and delegates everything else."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self._lock = threading.Lock()
        self._phase = Traffic()
        self.total = Traffic()
        self.dealer_nodes: set[int] = set()  # nodes sent ``query.dealer_*`` messages

    # -- metering ------------------------------------------------------------------------------

    def take(self) -> Traffic:
        """Costs since the previous call (and start a new phase)."""
        with self._lock:
            phase, self._phase = self._phase, Traffic()
            phase.dealer_nodes = set(self.dealer_nodes)
        return phase

    def _count(self, node_id: int, costs: NodeCosts) -> None:
        with self._lock:
            for traffic in (self._phase, self.total):
                traffic.node(node_id).add(costs)

    # -- Grid ----------------------------------------------------------------------------------

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # nothing sent: no round trip (a strategy's idle round)
            return []
        self._sent(messages)
        if type(self._grid) is InMemoryGrid:  # a simulation: polled faster than its fixed 0.1 s
            replies = gather(self._grid, messages, timeout)
        else:
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        with self._lock:
            self._phase.round_trips += 1
            self.total.round_trips += 1
        self._received(replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Metered as :meth:`send_and_receive` (a streamed conversation's round trips are the
        strategy's to count: its longest chain of messages)."""
        messages = list(messages)
        self._sent(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._received(replies)
        return replies

    def _sent(self, messages: list[Message]) -> None:
        for message in messages:
            if message.metadata.message_type.startswith("query.dealer_"):
                with self._lock:
                    self.dealer_nodes.add(message.metadata.dst_node_id)
                    self.total.dealer_nodes.add(message.metadata.dst_node_id)
            self._count(message.metadata.dst_node_id,
                        NodeCosts(bytes_down=record_bytes(message.content), messages=1))

    def _received(self, replies: list[Message]) -> None:
        """Count the replies' bytes and take the ClientApp's cost record out of each."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                continue
            costs = NodeCosts(bytes_up=record_bytes(reply.content))
            record = reply.content.get(COSTS_KEY)
            if isinstance(record, MetricRecord):
                del reply.content[COSTS_KEY]
                cpu = float(record.get("cpu-seconds", 0.0))
                message_type = reply.metadata.message_type
                if message_type in FINETUNE_TYPES:
                    costs.finetune_cpu_seconds = cpu
                elif message_type.split(".")[0] == "evaluate":
                    costs.eval_cpu_seconds = cpu
                elif message_type.split(".")[0] == "train":
                    costs.train_cpu_seconds = cpu
                costs.setup_cpu_seconds = float(record.get("setup-cpu-seconds", 0.0))
                costs.peak_rss_bytes = int(record.get("peak-rss-bytes", 0))
                costs.rss_above_baseline_bytes = int(record.get("rss-above-baseline-bytes", 0))
                costs.torch_threads = int(record.get("torch-threads", 0))
                costs.partition_id = int(record.get("partition-id", -1))
            self._count(node, costs)
