"""The dealer as its own Flower node: node roles, key files, and the dealer's handlers.

Why a node: a dealer inside the ServerApp gives whoever runs the cloud every tenant's
Beaver material, and with it everything the tenants send (docs/secure.md §9). So in
secure mode the dealer is a SuperNode of its own, run by a party that does not collude
with the cloud, and the ServerApp only relays requests to it.

Roles (``query.role``): node config ``role`` is ``"tenant"`` (default) or ``"dealer"``. A
simulation has no per-node config: with ``simulated-dealer`` the node of the last
``partition-id`` is the dealer (``flower-split simulate`` sets it for secure runs).

Keys: the dealer's long-term Ed25519 key file comes from node config ``dealer-key`` (or the
environment variable ``FLOWER_SPLIT_DEALER_KEY``); a tenant pins the public half through
``dealer-public-key`` (or ``FLOWER_SPLIT_DEALER_PUBLIC_KEY``): hex or a ``dealer.pub`` file.
Environment variables exist for simulations, whose nodes have no config of their own; in a
deployment set them per machine or use the node config.

The dealer's state (session key, per-tenant keys and step counters) lives in its node's
``context.state``; each message loads it, handles every tenant in it (a tenant's error is
reported for that tenant alone) and writes it back.
"""

from __future__ import annotations

import os
from logging import WARNING
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import log

from flower_split.flower.contract import MessageType, RecordKey
from flower_split.flower.dealer_records import (
    pack_bundles, pack_hellos, pack_outcome, unpack_hello_request, unpack_registrations, unpack_requests,
)
from flower_split.flower.node_state import mirrored, node_state_dir, rollback
from flower_split.flower.context_state import records_to_state, state_to_records
from flower_split.flower.settings import FlowerSettings
from flower_split.protocol import ProtocolError
from flower_split.protocol.dealer_identity import identity_public, load_identity, load_pinned
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.state import StateError

ROLE_KEY = "role"
TENANT_ROLE, DEALER_ROLE = "tenant", "dealer"
ROLES = (TENANT_ROLE, DEALER_ROLE)
DEALER_KEY_CONFIG, DEALER_PUBLIC_CONFIG = "dealer-key", "dealer-public-key"
DEALER_KEY_ENV, DEALER_PUBLIC_ENV = "FLOWER_SPLIT_DEALER_KEY", "FLOWER_SPLIT_DEALER_PUBLIC_KEY"
UNPINNED_CONFIG, UNPINNED_ENV = "allow-unpinned-dealer", "FLOWER_SPLIT_ALLOW_UNPINNED_DEALER"
DEALER_ARRAYS, DEALER_STATE = "dealer.arrays", "dealer.config"
PROTOCOL_ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def node_role(node_config: Mapping[str, Any], settings: FlowerSettings) -> str:
    """``"tenant"`` or ``"dealer"``: node config ``role``, else the simulated-dealer rule."""
    if ROLE_KEY in node_config:
        role = node_config[ROLE_KEY]
        if role not in ROLES:
            raise ValueError(f"node_config: role must be one of {ROLES}, got {role!r}")
        return str(role)
    if settings.simulated_dealer:
        try:
            last = int(node_config["partition-id"]) == int(node_config["num-partitions"]) - 1
        except (KeyError, TypeError, ValueError):
            return TENANT_ROLE
        return DEALER_ROLE if last else TENANT_ROLE
    return TENANT_ROLE


def node_setting(node_config: Mapping[str, Any], key: str, env: str) -> str | None:
    """Node config ``key``, else environment variable ``env`` (simulated nodes); None when unset or empty."""
    value = node_config.get(key, os.environ.get(env))
    return None if value in (None, "") else str(value)


def node_flag(node_config: Mapping[str, Any], key: str, env: str) -> bool:
    """A yes/no :func:`node_setting` (``true``, ``1`` or ``yes``; anything else is no)."""
    value = node_setting(node_config, key, env)
    return value is not None and value.strip().lower() in ("1", "true", "yes")


def pinned_dealer(node_config: Mapping[str, Any]) -> bytes | None:
    """The dealer key this tenant pins, or None when none is configured."""
    spec = node_setting(node_config, DEALER_PUBLIC_CONFIG, DEALER_PUBLIC_ENV)
    if spec is None:
        return None
    try:
        return load_pinned(spec)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc


def allow_unpinned(node_config: Mapping[str, Any]) -> bool:
    """Whether this tenant accepts an unsigned dealer hello when it pins no key.

    The tenant's own choice (node config ``allow-unpinned-dealer`` or
    ``FLOWER_SPLIT_ALLOW_UNPINNED_DEALER=1``), never the run config's: whoever submits the
    run is the cloud, and an unsigned hello lets the cloud be the dealer. Only for a dealer
    co-located with the cloud (``insecure-colocated-dealer``, tests and demos); warned.
    """
    allowed = node_flag(node_config, UNPINNED_CONFIG, UNPINNED_ENV)
    if allowed:
        log(WARNING, "this tenant accepts an unsigned dealer hello (%s): the cloud can act as the dealer and open "
                     "everything it sends", UNPINNED_CONFIG)
    return allowed


def dealer_identity(node_config: Mapping[str, Any]) -> Ed25519PrivateKey:
    """The dealer node's long-term key (its file must be configured)."""
    path = node_setting(node_config, DEALER_KEY_CONFIG, DEALER_KEY_ENV)
    if path is None:
        raise ProtocolError(f"dealer node: no key file (node config {DEALER_KEY_CONFIG!r} or ${DEALER_KEY_ENV}; "
                            "make one with `flower-split dealer-keygen`)")
    try:
        return load_identity(path)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc


def _load(context: Context) -> SecureDealerParty:
    identity = dealer_identity(context.node_config)
    party = SecureDealerParty(identity)
    arrays, meta = context.state.get(DEALER_ARRAYS), context.state.get(DEALER_STATE)
    if arrays is not None and meta is not None:
        party.load_state_dict(records_to_state(arrays, meta))
        if party.identity != identity_public(identity):
            raise ProtocolError("dealer node: its key file changed since its tenants were registered")
    return party


def _save(context: Context, party: SecureDealerParty) -> None:
    arrays, meta = state_to_records(party.state_dict())
    context.state[DEALER_ARRAYS] = arrays
    context.state[DEALER_STATE] = meta


def dealer_hello(message: Message, party: SecureDealerParty) -> RecordDict:
    return pack_hellos([party.hello(t) for t in unpack_hello_request(message.content)], party.identity)


def dealer_register(message: Message, party: SecureDealerParty) -> RecordDict:
    errors: dict[str, str] = {}
    for registration in unpack_registrations(message.content):
        errors[registration.tenant] = _confined(lambda r=registration: party.register(r))
    return pack_outcome(errors)


def dealer_material(message: Message, party: SecureDealerParty) -> RecordDict:
    bundles, errors = [], {}
    for request in unpack_requests(message.content):
        errors[request.tenant] = _confined(lambda r=request: bundles.append(party.handle(r)))
    return pack_bundles(bundles, errors)


def _confined(work: Callable[[], object]) -> str:
    """Run one tenant's part of a dealer message; any failure is that tenant's error alone.

    (Every exception, not only ProtocolError: one tenant's request that exhausts memory must
    not turn the reply for every other tenant into an error.)
    """
    try:
        work()
        return ""
    except ProtocolError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - confined to this tenant on purpose, reported to the cloud
        return f"{type(exc).__name__}: {exc}"


DealerHandler = Callable[[Message, SecureDealerParty], RecordDict]
DEALER_HANDLERS: dict[str, DealerHandler] = {
    MessageType.DEALER_HELLO: dealer_hello,
    MessageType.DEALER_REGISTER: dealer_register,
    MessageType.DEALER_MATERIAL: dealer_material,
}


def handle_dealer(handler: DealerHandler, message: Message, context: Context, settings: FlowerSettings) -> Message:
    """Run a dealer handler on a dealer node; anything else gets a clear error reply."""
    saved = dict(context.state.items())
    try:
        if node_role(context.node_config, settings) != DEALER_ROLE:
            raise ProtocolError(f"{message.metadata.message_type}: this node is not the dealer")
        with mirrored(context, node_state_dir(context, settings, None), {"role": DEALER_ROLE, "tenant": ""}):
            party = _load(context)
            content = handler(message, party)
            _save(context, party)
    except (ProtocolError, ValueError, StateError, OSError) as exc:
        rollback(context, saved)
        return Message(Error(code=PROTOCOL_ERROR_CODE, reason=f"{type(exc).__name__} (dealer): {exc}"),
                       reply_to=message)
    return Message(content, reply_to=message)


def role_record(role: str, tenant: str = "", identity: bytes = b"") -> RecordDict:
    """A ``query.role`` reply (a dealer names its long-term public key)."""
    return RecordDict({RecordKey.ROLE: ConfigRecord({"role": role, "tenant": tenant, "identity": identity})})
