"""A Flower Grid that hands every message to a ClientApp in this process, one Context per node.

The strategies and ClientApps are the real ones; only the network is gone: each message is
delivered by calling the ClientApp, as Flower's simulation does inside one worker. Tests use
it to drive whole runs, kill nodes (empty a node's ``context.state``) and restart the cloud;
benchmarks use it to time the protocol's compute apart from Flower's latency (say so when
reporting). ``send_and_receive`` delivers in order and returns every reply; ``push_messages``
delivers in order and keeps the replies for ``pull_messages`` (a node that gives none gets at
once the error reply Flower's SuperLink gives when a reply expires). Each node gets its
own copy of a message's content, as over a network: Flower's SecAgg+ workflow sends one
``RecordDict`` object to every node and its client mod edits what it receives.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


REPLY_EXPIRED = 4  # flwr.common.constant.ErrorCode.REPLY_MESSAGE_UNAVAILABLE


class LocalGrid(Grid):
    """Nodes ``1..len(node_configs)`` (node id -> node config), all served by ``client_app``."""

    shares_machine = True  # every party in this process (flower.stream.shares_machine)

    def __init__(self, client_app: Callable[[Message, Context], Message],
                 node_configs: Mapping[int, Mapping[str, Any]], run_id: int = 1) -> None:
        self.client_app = client_app
        self._replies: dict[str, Message] = {}
        self.contexts = {node: Context(run_id=run_id, node_id=node, node_config=dict(config), state=RecordDict(),
                                       run_config={}) for node, config in node_configs.items()}

    def deliver(self, message: Message) -> Message | None:
        """The reply of the message's node (None: no reply); subclasses may intercept."""
        return self.client_app(message, self.contexts[message.metadata.dst_node_id])

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [reply for reply in map(self.deliver, map(copy.deepcopy, messages)) if reply is not None]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            mid = uuid4().hex
            message.metadata.__dict__["_message_id"] = mid
            reply = self.deliver(copy.deepcopy(message))
            if reply is None:  # nothing can come later in process: expired at once
                reply = Message(Error(code=REPLY_EXPIRED, reason="no reply (the node returned none)"), reply_to=message)
            reply.metadata.__dict__["_reply_to_message_id"] = mid  # a subclass may deliver another message
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    # the parts of Flower's Grid the split strategies do not use
    def set_run(self, run: object) -> None: ...

    @property
    def run(self) -> None:
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError("LocalGrid: build Message objects directly")


