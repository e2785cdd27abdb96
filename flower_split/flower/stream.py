"""Conversations with many nodes at once, each at its own pace: a reply is answered when it arrives.

Lockstep (:meth:`~flower_split.flower.strategy.SplitStrategyBase.exchange`: push every node's
message, wait for every reply, then answer them all) makes each round trip cost the slowest
node's time plus the cloud's time for all of them. A secure step is ten round trips per tenant,
each answered by the cloud for that tenant alone (nothing is stacked across tenants), so
answering each reply as soon as it arrives lets the cloud work for one tenant while the others
compute: a round costs about the larger of the two instead of their sum.

Only Flower's ``Grid.push_messages`` / ``pull_messages`` are used, polled with a short pause
that grows while nothing arrives (``MIN_PAUSE`` to ``MAX_PAUSE``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid

MIN_PAUSE, MAX_PAUSE = 0.002, 0.05  # seconds between polls: short after a reply, longer while idle


def converse(grid: Grid, opening: Iterable[Message], answer: Callable[[Message], Message | None],
             fail: Callable[[int, Error | None, float], None], timeout: float | None) -> Counter[int]:
    """Push ``opening`` (one message per node) and answer every reply as it arrives until no
    message is in flight; how many messages each node was sent.

    ``answer(reply)``: the node's next message (to the reply's sender), or None when its part is
    over. ``fail(node, error, waited)``: a message that could not be pushed (``error`` None,
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
    pause = MIN_PAUSE
    while flights:
        replies = list(grid.pull_messages(list(flights)))
        now = time.perf_counter()
        if not replies:
            for mid, (node, pushed_at) in list(flights.items()):
                if timeout is not None and now - pushed_at > timeout:
                    del flights[mid]
                    fail(node, None, now - pushed_at)
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE)
            continue
        pause = MIN_PAUSE
        for reply in replies:
            entry = flights.pop(reply.metadata.reply_to_message_id, None)
            if entry is None:  # not ours, or already given up on
                continue
            node, pushed_at = entry
            if reply.has_error():
                fail(node, reply.error, now - pushed_at)
                continue
            nxt = answer(reply)
            if nxt is not None:  # pushed at once: the node computes while the cloud answers the others
                push([nxt])
    return sent
