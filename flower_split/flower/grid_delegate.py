"""A Flower :class:`Grid` that hands everything to another grid: the base of grid wrappers.

The ServerApp's grid is wrapped for metering (:class:`flower_split.flower.metering.MeteredGrid`)
and for the direct channel (:class:`flower_split.flower.direct_channel.ChannelGrid`); each
overrides ``send_and_receive`` and inherits the rest from here.
"""

from __future__ import annotations

from typing import Any, Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class DelegatingGrid(Grid):
    """Every :class:`Grid` method passed on to ``grid``."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run
