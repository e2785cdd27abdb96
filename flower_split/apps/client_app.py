"""Flower ClientApp of a tenant: every security backend's handlers, registered in one loop.

Every Flower message is handled by a handler of :mod:`flower_split.flower.plain_handlers` or
:mod:`flower_split.flower.secure_handlers` (message types in
:class:`flower_split.flower.contract.MessageType`), run all-or-nothing by
:func:`flower_split.flower.tenant.handle`: the party is rebuilt from ``context.state`` (the
only thing that survives between messages; in deployment each message runs in a fresh
process), and its state is written back only when the whole message was handled.

The dealer of secure mode runs this same app on a node of its own (node config
``role = "dealer"``): :mod:`flower_split.flower.dealer_node` handles its ``query.dealer_*``
messages, and ``query.role`` tells the strategy which node is which.

Node config: ``partition-id`` and ``num-partitions`` (which partition of the run's data set
this tenant trains on); ``role`` (``tenant`` or ``dealer``); ``dealer-public-key`` (a tenant:
the dealer key it pins) and ``dealer-key`` (the dealer: its key file); ``worker-socket`` (hand
every message to the long-lived tenant worker listening there, :mod:`flower_split.apps.tenant_worker`).

``app`` (the ClientApp ``flwr run`` loads) is a router that imports only Flower: Flower starts a
fresh process for every message in a deployment, and with ``worker-socket`` that process
relays the message to the worker and never imports torch. Without it, the handlers run in the
process, loaded on the first message (:func:`make_client_app`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flower_split.flower.contract import MessageType, split_type
from flower_split.flower.worker_link import WORKER_SOCKET, forward

if TYPE_CHECKING:
    from flower_split.flower.dealer_node import DealerHandler
    from flower_split.flower.tenant import Handler


def _bind(handler: "Handler", overrides: Mapping[str, Any],
          security: str | None = None) -> Callable[[Message, Context], Message]:
    """``handler`` as a ClientApp function; ``security``: the level whose runs it serves (None: any)."""
    from flower_split.backends import backend_for
    from flower_split.flower.tenant import handle

    def run(message: Message, context: Context) -> Message:
        return handle(handler, message, context, overrides, validate=backend_for, security=security)

    run.__name__ = run.__qualname__ = handler.__name__.lstrip("_")
    return run


def _bind_dealer(handler: "DealerHandler", overrides: Mapping[str, Any]) -> Callable[[Message, Context], Message]:
    from flower_split.flower.dealer_node import handle_dealer
    from flower_split.flower.settings import settings_from_run_config

    def run(message: Message, context: Context) -> Message:
        _, settings = settings_from_run_config({**dict(context.run_config), **overrides})
        return handle_dealer(handler, message, context, settings)

    run.__name__ = run.__qualname__ = handler.__name__
    return run


def _bind_role(overrides: Mapping[str, Any]) -> Callable[[Message, Context], Message]:
    from flower_split.flower.dealer_node import DEALER_ROLE, dealer_identity, node_role, role_record
    from flower_split.flower.settings import settings_from_run_config
    from flower_split.flower.tenant import tenant_data
    from flower_split.protocol.dealer_identity import identity_public

    def role(message: Message, context: Context) -> Message:
        """``query.role``: this node's role and, for a tenant, its tenant id."""
        config, settings = settings_from_run_config({**dict(context.run_config), **overrides})
        if node_role(context.node_config, settings) == DEALER_ROLE:
            identity = identity_public(dealer_identity(context.node_config))
            return Message(role_record(DEALER_ROLE, identity=identity), reply_to=message)
        return Message(role_record("tenant", tenant_data(config, settings, context.node_config).tenant),
                       reply_to=message)

    return role


def make_client_app(overrides: Mapping[str, Any] | None = None, mods: list[Any] | None = None) -> ClientApp:
    """The tenant's ClientApp; ``overrides`` take precedence over ``context.run_config`` (tests).

    ``mods``: Flower mods wrapped around every handler (e.g. the cost meter of simulations).
    Imports the backends (torch, transformers): called in the process that runs the handlers.
    """
    from flower_split.backends import BACKENDS
    from flower_split.flower.dealer_node import DEALER_HANDLERS
    from flower_split.flower.sharing_client import register_sharing

    extra = dict(overrides or {})
    client_app = ClientApp(mods=mods)
    registered: dict[str, str] = {}
    for backend in BACKENDS.values():
        for message_type, handler in backend.handlers.items():
            if message_type in registered:
                raise ValueError(f"{message_type}: handled by both {registered[message_type]} and {backend.name}")
            registered[message_type] = backend.name
            category, action = split_type(message_type)
            getattr(client_app, category)(action)(_bind(handler, extra, backend.name))
    for message_type, dealer_handler in DEALER_HANDLERS.items():
        category, action = split_type(message_type)
        getattr(client_app, category)(action)(_bind_dealer(dealer_handler, extra))
    category, action = split_type(MessageType.ROLE)
    getattr(client_app, category)(action)(_bind_role(extra))
    category, action = split_type(MessageType.CHANNEL_OPEN)
    getattr(client_app, category)(action)(_no_channel)
    register_sharing(client_app, lambda handler: _bind(handler, extra), extra)
    return client_app


def _no_channel(message: Message, context: Context) -> Message:
    """``query.channel_open`` to a node without a tenant worker: it stays on Flower."""
    from flwr.app.error import Error

    from flower_split.flower.worker_link import WORKER_ERROR_CODE

    return Message(Error(code=WORKER_ERROR_CODE, reason="no tenant worker on this node (node config "
                         "worker-socket): it stays on Flower, no direct channel"), reply_to=message)


def message_types() -> list[str]:
    """Every message type of the contract (:class:`MessageType`) but the simulations' warm-up."""
    return sorted(value for name, value in vars(MessageType).items()
                  if not name.startswith("_") and isinstance(value, str) and value != MessageType.WARM_UP)


@functools.cache
def _in_process() -> ClientApp:
    return make_client_app()


def route(message: Message, context: Context) -> Message:
    """To the tenant worker when the node config names one, else to the handlers in this process."""
    if context.node_config.get(WORKER_SOCKET):
        return forward(message, context)
    return _in_process()(message, context)


def make_router() -> ClientApp:
    """The ClientApp ``flwr run`` loads: :func:`route` under every message type."""
    router = ClientApp()
    for message_type in message_types():
        if "." not in message_type:  # a category's default action (SecAgg+'s plain "train")
            getattr(router, message_type)()(route)
            continue
        category, action = split_type(message_type)
        getattr(router, category)(action)(route)
    return router


app = make_router()
