"""Conversations with many nodes at once, each at its own pace: a reply is answered when it arrives.

Lockstep (:meth:`~flower_split.flower.strategy.SplitStrategyBase.exchange`: push every node's
message, wait for every reply, then answer them all) makes each round trip cost the slowest
node's time plus the cloud's time for all of them. A secure step is ten round trips per tenant,
each answered by the cloud for that tenant alone (nothing is stacked across tenants), so
answering each reply as soon as it arrives lets the cloud work for one tenant while the others
compute: a round costs about the larger of the two instead of their sum.

Only Flower's ``Grid.push_messages`` / ``pull_messages`` are used, polled with a short pause
that grows while nothing arrives, from the grid's :func:`poll_pause` to ``MAX_PAUSE``. Flower's
``HttpGrid`` (a deployment's ServerApp) pulls a reply whose objects are still uploading with a
back-off of seconds, blocking every other tenant meanwhile, so it is polled at most every
``HTTP_PAUSE``; in-memory grids and the direct channel as fast as ``MIN_PAUSE``.

:func:`gather` is ``Grid.send_and_receive`` (every reply, then go on) on the same pacing: Flower's
in-memory grid polls every 0.1 s, about 0.05 s lost per round trip (~15 s of a secure round's 320
expected; within the noise where measured, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

MIN_PAUSE, MAX_PAUSE = 0.002, 0.02  # seconds between polls: short after a reply, longer while idle
HTTP_PAUSE = 0.5  # Flower's HttpGrid: no faster (its own send_and_receive polls every 3 s)


def poll_pause(grid: Grid) -> float:
    """The shortest pause between polls of ``grid``: its ``poll_pause`` attribute if it has one,
    else that of the grid it wraps (``_grid``), else ``HTTP_PAUSE`` for Flower's ``HttpGrid`` and
    ``MIN_PAUSE`` for any other."""
    pause = getattr(grid, "poll_pause", None)
    if isinstance(pause, (int, float)):
        return float(pause)
    inner = getattr(grid, "_grid", None)
    if isinstance(inner, Grid):
        return poll_pause(inner)
    return HTTP_PAUSE if isinstance(grid, HttpGrid) else MIN_PAUSE


def innermost(grid: Grid) -> Grid:
    """The grid under every wrapper (each wrapper keeps the grid it wraps as ``_grid``)."""
    inner = getattr(grid, "_grid", None)
    return innermost(inner) if isinstance(inner, Grid) else grid


def shares_machine(grid: Grid) -> bool:
    """Whether every party runs on the ServerApp's machine: Flower's simulation (its in-memory
    grid) or a grid that says so (``shares_machine = True``: the in-process grid). There the
    tenants' work competes with the cloud's for the same cores, and overlapping them was
    measured slower than lockstep on a 2-core VM (docs/BENCHMARKS.md)."""
    inner = innermost(grid)
    return isinstance(inner, InMemoryGrid) or bool(getattr(inner, "shares_machine", False))


def _next_pause(pause: float, shortest: float) -> float:
    return min(2 * pause, max(MAX_PAUSE, shortest))


def gather(grid: Grid, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """What Flower's ``send_and_receive`` does (push ``messages``, pull until each has its reply or
    ``timeout`` seconds have passed, None: wait for ever, 0 or less: no pull; the replies that
    came), polled from :func:`poll_pause` up to ``MAX_PAUSE`` like :func:`converse`, not at
    Flower's fixed pace, and never more often than every ten pulls' time (a pull costs in
    proportion to the messages awaited, under the link state's lock)."""
    waiting = {mid for mid in grid.push_messages(messages) if mid}
    deadline = None if timeout is None else time.monotonic() + timeout
    shortest = pause = poll_pause(grid)
    replies: list[Message] = []
    while waiting and (deadline is None or time.monotonic() < deadline):
        started = time.perf_counter()
        pulled = list(grid.pull_messages(list(waiting)))
        floor = 10 * (time.perf_counter() - started)
        replies += pulled
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        if not waiting:
            break
        pause = max(floor, shortest if pulled else _next_pause(pause, shortest))
        time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
    return replies


def converse(grid: Grid, opening: Iterable[Message], answer: Callable[[int, Message], Message | None],
             fail: Callable[[int, Error | None, float], None], timeout: float | None) -> Counter[int]:
    """Push ``opening`` (one message per node) and answer every reply as it arrives until no
    message is in flight; how many messages each node was sent.

    ``answer(node, reply)``: the node's next message, or None when its part is over (``node``:
    where the message replied to went; a reply from any other node is that node's failure). ``fail(node, error, waited)``: a message that could not be pushed (``error`` None,
    ``waited`` 0), an error reply, or no reply within ``timeout`` seconds of its push (None:
    wait for ever); that node's conversation ends there. ``answer`` and ``fail`` may raise
    nothing: they are the caller's, and handle their own refusals.
    """
    flights: dict[str, tuple[int, float]] = {}  # message id -> (node, pushed at)
    sent: Counter[int] = Counter()

    def push(messages: list[Message]) -> None:
        if not messages:
            return
        pushed = {mid for mid in grid.push_messages(messages) if mid}
        now = time.perf_counter()
        for message in messages:  # both Flower grids set the id on the message they push
            node, mid = message.metadata.dst_node_id, message.metadata.message_id
            sent[node] += 1
            if mid and mid in pushed:
                flights[mid] = (node, now)
            else:
                fail(node, None, 0.0)

    push(list(opening))
    shortest = poll_pause(grid)
    pause = shortest
    while flights:
        replies = list(grid.pull_messages(list(flights)))
        now = time.perf_counter()
        for reply in replies:
            entry = flights.pop(reply.metadata.reply_to_message_id, None)
            if entry is None:  # not ours, or already given up on
                continue
            node, pushed_at = entry
            if reply.has_error() or reply.metadata.src_node_id != node:
                fail(node, reply.error if reply.has_error() else None, now - pushed_at)
                continue
            following = answer(node, reply)
            if following is not None:  # pushed at once: the node computes while the cloud answers the others
                push([following])
        for mid, (node, pushed_at) in list(flights.items()):
            if timeout is not None and now - pushed_at > timeout:
                del flights[mid]
                fail(node, None, now - pushed_at)
        if replies:
            pause = shortest
        else:
            time.sleep(pause)
            pause = _next_pause(pause, shortest)
    return sent
