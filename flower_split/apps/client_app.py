"""Flower ClientApp of a tenant: every security backend's handlers, registered in one loop.

Every Flower message is handled by a handler of :mod:`flower_split.flower.plain_handlers` or
:mod:`flower_split.flower.secure_handlers` (message types in
:class:`flower_split.flower.contract.MessageType`), run all-or-nothing by
:func:`flower_split.flower.tenant.handle`: the party is rebuilt from ``context.state`` (the
only thing that survives between messages; in deployment each message runs in a fresh
process), and its state is written back only when the whole message was handled.

Node config: ``partition-id`` and ``num-partitions`` (which partition of the run's data set
this tenant trains on).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_split.backends import BACKENDS, backend_for
from flower_split.flower.contract import split_type
from flower_split.flower.tenant import Handler, handle


def _bind(handler: Handler, overrides: Mapping[str, Any]) -> Callable[[Message, Context], Message]:
    def run(message: Message, context: Context) -> Message:
        return handle(handler, message, context, overrides, validate=backend_for)

    run.__name__ = run.__qualname__ = handler.__name__.lstrip("_")
    return run


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The tenant's ClientApp; ``overrides`` take precedence over ``context.run_config`` (tests).

    ``mods``: Flower mods wrapped around every handler (e.g. the cost meter of simulations).
    """
    extra = dict(overrides or {})
    client_app = ClientApp(mods=mods)
    registered: dict[str, str] = {}
    for backend in BACKENDS.values():
        for message_type, handler in backend.handlers.items():
            if message_type in registered:
                raise ValueError(f"{message_type}: handled by both {registered[message_type]} and {backend.name}")
            registered[message_type] = backend.name
            category, action = split_type(message_type)
            getattr(client_app, category)(action)(_bind(handler, extra))
    return client_app


app = make_client_app()
