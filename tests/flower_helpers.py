"""In-process Flower plumbing for tests: a Grid that calls ClientApps directly, and a check
that client messages leave no data in reference cycles."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable, Iterable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from flower_split.flower.local_grid import LocalGrid as BaseLocalGrid
from flower_split.flower.sharing_keys import KEY_FILES
from flower_split.protocol.dealer_identity import new_identity, save_identity


def cyclic_data(action: Callable[[], object]) -> list[str]:
    """Types of the tensors and Flower arrays that ``action`` left in reference cycles.

    Such garbage is freed only by Python's cyclic collector, which runs by object count, not
    size: in a client process serving many tenants it piled up to >16 GB (docs/BENCHMARKS.md).
    """
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        action()
        gc.collect()
        return [type(o).__name__ for o in gc.garbage if isinstance(o, (torch.Tensor, Array, ArrayRecord))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def checked_for_cycles(client_app: Callable[[Message, Context], Message],
                       found: list[str]) -> Callable[[Message, Context], Message]:
    """``client_app`` that appends to ``found`` what each message left in cycles, and fails on error replies."""

    def checked(message: Message, context: Context) -> Message:
        reply: list[Message] = []
        found.extend(cyclic_data(lambda: reply.append(client_app(message, context))))
        assert not reply[0].has_error(), reply[0].error
        return reply[0]

    return checked


class StubGrid(Grid):
    """The parts of Flower's Grid a split strategy does not use (``send_and_receive`` and
    ``get_node_ids`` are the subclass's)."""

    def set_run(self, run: object) -> None: ...

    @property
    def run(self) -> None:
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


class LocalGrid(BaseLocalGrid):
    """:class:`flower_split.flower.local_grid.LocalGrid` for tests: tenants 1..num_nodes on
    partitions of the run's data, an optional dealer node, and fault injection.

    ``intercept(node, message_type)`` may return ``"silent"`` (no reply) or ``"error"``.
    ``dealer``: a directory; then node ``num_nodes + 1`` is secure mode's dealer node (node
    config ``role = "dealer"`` with a fresh key file written there) and every tenant pins its
    public key, as in a deployment. ``unpinned``: the tenants accept an unsigned hello (their
    own ``allow-unpinned-dealer``; for a strategy with the dealer co-located, insecure).
    ``node_config``: more node config for every node (e.g. ``state-dir``). ``sharing_keys``: a
    directory; then every tenant gets a sharing key of its own there and pins the others' (node
    config ``share-key`` / ``share-peers``, as in a deployment).
    """

    def __init__(self, client_app: Callable[[Message, Context], Message], num_nodes: int,
                 intercept: Callable[[int, str], str | None] | None = None, dealer: str | Path | None = None,
                 unpinned: bool = False, node_config: dict[str, object] | None = None,
                 sharing_keys: str | Path | None = None) -> None:
        self.intercept = intercept or (lambda node, kind: None)
        extra = dict(node_config or {})
        pinned: dict[str, object] = {"allow-unpinned-dealer": True} if unpinned else {}
        configs: dict[int, dict[str, object]] = {}
        if dealer is not None:
            private, public = save_identity(new_identity(), dealer)
            pinned = {"dealer-public-key": str(public)}
            configs[num_nodes + 1] = {"role": "dealer", "dealer-key": str(private), **extra}
            self.dealer_node = num_nodes + 1
        for node in range(1, num_nodes + 1):
            configs[node] = {"partition-id": node - 1, "num-partitions": num_nodes, **pinned, **extra}
        if sharing_keys is not None:
            keys = {node: save_identity(new_identity(), Path(sharing_keys) / str(node), KEY_FILES)
                    for node in range(1, num_nodes + 1)}
            for node, (private, _) in keys.items():
                peers = ",".join(public.read_text().strip() for other, (_, public) in keys.items() if other != node)
                configs[node].update({"share-key": str(private), "share-peers": peers})
        super().__init__(client_app, dict(sorted(configs.items())))

    def deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        action = self.intercept(node, message.metadata.message_type)
        if action == "silent":
            return None
        if action == "error":
            message = Message(RecordDict({"garbage": ConfigRecord({"x": 1})}), node, message.metadata.message_type)
        return self.client_app(message, self.contexts[node])
