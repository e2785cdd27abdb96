"""In-process Flower plumbing for tests: a Grid that calls ClientApps directly."""

from __future__ import annotations

from typing import Callable, Iterable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid


class LocalGrid(Grid):
    """Delivers messages to ClientApps in process, one Context per node (like the simulation).

    ``intercept(node, message_type)`` may return ``"silent"`` (no reply) or ``"error"``.
    """

    def __init__(self, client_app: Callable[[Message, Context], Message], num_nodes: int,
                 intercept: Callable[[int, str], str | None] | None = None) -> None:
        self.client_app = client_app
        self.intercept = intercept or (lambda node, kind: None)
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                          state=RecordDict(), run_config={})
            for node in range(1, num_nodes + 1)
        }

    def set_run(self, run: object) -> None: ...

    @property
    def run(self) -> None:
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            action = self.intercept(node, message.metadata.message_type)
            if action == "silent":
                continue
            if action == "error":
                message = Message(RecordDict({"garbage": ConfigRecord({"x": 1})}), node,
                                  message.metadata.message_type)
            replies.append(self.client_app(message, self.contexts[node]))
        return replies
