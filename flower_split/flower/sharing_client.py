"""Opt-in cross-tenant sharing, the tenant's side (the cloud's: :mod:`~flower_split.flower.sharing_server`).

``train`` (Flower's SecAgg+ stages, all four through the tenant's own rules,
:mod:`~flower_split.flower.sharing_policy`, and ``flwr.client.mod.secaggplus_mod``): at
the collect stage the mod calls :func:`share_fit`, which returns the tenant's shared
parameters as a legacy ``FitRes`` (weight 1); the mod quantizes, masks and sends them. Split-plain:
the float parameters (a value outside SecAgg+'s clipping range is refused, never clipped);
split-secure: the tenant's halves, encoded for a modulo-2^31 sum
(:func:`~flower_split.flower.sharing_params.encode_half`).

``train.share_load``: the aggregate. Plain: the mean, loaded in place of the tenant's own
shared parameters (optimizer momentum kept). Secure: the tenants' halves' sum ``C``, the
count ``n`` and the load's number (the tenant loads only its next one); the tenant's new half
is ``-floor(-C / n)``, the cloud's is ``floor(S / n)``
(:func:`~flower_split.flower.sharing_params.average_half`), both with a fresh momentum; the
ack carries the tenant's count of loads, and a lost ack is completed by the cloud when the
tenant's next begin reports that count (:meth:`~flower_split.protocol.secure_cloud_tenant.CloudTenant.settle_load`). Parameters outside the run's
scope are never touched (with ``tail`` / ``head-tail`` the classifier stays personal). One load
per phase, right after the tenant's own unmask stage (:func:`~flower_split.flower.sharing_policy.note_load`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from flower_split.config import RunConfig
from flower_split.flower.contract import ConfigKey, MessageType, RecordKey, split_type
from flower_split.flower.dealer_node import PROTOCOL_ERROR_CODE
from flower_split.flower.plain_handlers import _load_party, _save_party
from flower_split.flower.records import config_value
from flower_split.flower.secure_handlers import _load, _put_back, _save
from flower_split.flower.settings import FlowerSettings
from flower_split.flower.secagg_prg import install as install_full_entropy_masks
from flower_split.flower.sharing_policy import (
    check_changed_since_load, note_load, note_loaded_halves, sharing_policy_mod,
)
from flower_split.flower.sharing_params import average_half, encode_half, halves, quantization, shared_names
from flower_split.flower.tenant import Handler, TenantData, restore_mod
from flower_split.protocol import ProtocolError


install_full_entropy_masks()  # Flower's SecAgg+ masks from 32 bits otherwise (flower.secagg_prg)


def _scope(record: ConfigRecord, settings: FlowerSettings) -> str:
    """The instruction's ``share`` scope, which must be the run's (a tenant never shares more)."""
    scope = config_value(record, ConfigKey.SHARE, str)
    if scope != settings.share or scope == "none":
        raise ProtocolError(f"config.share: the run shares {settings.share!r}, the instruction asks {scope!r}")
    return scope


def _plain_modules(party: Any) -> dict[str, torch.Tensor]:
    """A plain party's parameters by the names of :data:`~flower_split.flower.sharing_params.PLAIN_NAMES`."""
    named = {f"head.{k}": v for k, v in party.head.named_parameters()}
    named.update({f"tail.{k}": v for k, v in party.tail.named_parameters()})
    return named


def share_fit(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
              data: TenantData) -> RecordDict:
    """SecAgg+'s collect stage: this tenant's shared parameters as a legacy ``FitRes`` (weight 1)."""
    if RecordKey.FIT_CONFIG not in message.content.config_records:
        raise ProtocolError(f"{MessageType.SECAGG}: no {RecordKey.FIT_CONFIG} record")
    names = shared_names(config.security, _scope(message.content.config_records[RecordKey.FIT_CONFIG], settings))
    if halves(config.security):
        party = _load(context, data, config, settings)
        check_changed_since_load(context, _digests(party, names), bool(party.steps_in_flight))
        arrays = [encode_half(party.halves.weights[name]) for name in names]
        _put_back(context, party, data, config, settings)
    else:
        party, _ = _load_party(context, data, config, settings, drop_in_flight=True, known=True)
        params = _plain_modules(party)
        arrays = [params[name].detach().cpu().to(torch.float64).numpy() for name in names]
        clip = quantization("plain").clipping_range
        for name, array in zip(names, arrays):
            if array.size and float(np.abs(array).max()) > clip:
                raise ProtocolError(f"{name}: |value| {float(np.abs(array).max()):.3g} exceeds SecAgg+'s clipping "
                                    f"range {clip}; refusing to share a clipped value")
    fitres = FitRes(Status(Code.OK, "shared"), ndarrays_to_parameters(arrays), 1, {})
    return fitres_to_recorddict(fitres, keep_input=False)


def share_load(message: Message, context: Context, config: RunConfig, settings: FlowerSettings,
               data: TenantData) -> RecordDict:
    """Load the aggregate in place of the shared parameters; the personal ones stay."""
    content = message.content
    if RecordKey.CONFIG not in content.config_records or RecordKey.SHARED not in content.array_records:
        raise ProtocolError(f"{MessageType.SHARE_LOAD}: expected records {RecordKey.CONFIG} and {RecordKey.SHARED}")
    record = content.config_records[RecordKey.CONFIG]
    names = shared_names(config.security, _scope(record, settings))
    count = config_value(record, ConfigKey.SHARE_COUNT, int)
    arrays = content.array_records[RecordKey.SHARED]
    if sorted(arrays) != sorted(names):
        raise ProtocolError(f"{MessageType.SHARE_LOAD}: expected {names}, got {sorted(arrays)}")
    note_load(context, count)
    if halves(config.security):
        number = config_value(record, ConfigKey.SHARE_LOADS, int)
        party = _load(context, data, config, settings)
        means = {name: average_half(torch.from_numpy(_checked(arrays[name].numpy(), party.halves.weights[name],
                                                               np.int64, name)), count, 1, party.halves.frac_bits)
                 for name in names}
        party.load_shared(means, number)  # a fresh momentum on the mean, as the cloud's
        note_loaded_halves(context, _digests(party, names))
        _save(context, party, data, config, settings)
        return RecordDict({RecordKey.CONFIG: ConfigRecord({ConfigKey.SHARE_COUNT: count,
                                                           ConfigKey.SHARE_LOADS: party.counts["loads"]})})
    party, _ = _load_party(context, data, config, settings, drop_in_flight=True, known=True)
    params = _plain_modules(party)
    with torch.no_grad():
        for name in names:
            new = _checked(arrays[name].numpy(), params[name], np.float32, name)
            params[name].copy_(torch.from_numpy(new))
    _save_party(context, party)
    return RecordDict({RecordKey.CONFIG: ConfigRecord({ConfigKey.SHARE_COUNT: count})})


def _digests(party: Any, names: tuple[str, ...]) -> dict[str, str]:
    """SHA-256 of each of ``names``' halves in a group that trains (a frozen head keeps its loaded
    half, and is a no-op adapter whose half tells nothing: :func:`check_changed_since_load`)."""
    return {name: hashlib.sha256(party.halves.weights[name].numpy().tobytes()).hexdigest() for name in names
            if party.train_head or not name.startswith("head.")}


def _checked(array: np.ndarray, like: torch.Tensor, dtype: type, name: str) -> np.ndarray:
    """``array`` if it has ``like``'s shape and ``dtype`` (and is finite); else a ProtocolError."""
    if array.dtype != dtype or tuple(array.shape) != tuple(like.shape):
        raise ProtocolError(f"{MessageType.SHARE_LOAD}: {name} is {array.dtype}{list(array.shape)}, expected "
                            f"{np.dtype(dtype)}{list(like.shape)}")
    if dtype is np.float32 and not np.isfinite(array).all():
        raise ProtocolError(f"{MessageType.SHARE_LOAD}: {name} is not finite")
    return np.array(array, copy=True)


def error_reply_mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Outermost mod of the SecAgg+ handler: a stage that fails (``secaggplus_mod`` raises on an
    out-of-order stage or an error reply of :func:`share_fit`) becomes an error reply, as every
    other handler's failure does, so the workflow counts the tenant as a drop-out."""
    try:
        return call_next(message, context)
    except (ValueError, KeyError, TypeError) as exc:
        return Message(Error(code=PROTOCOL_ERROR_CODE, reason=f"SecAgg+ stage failed: {type(exc).__name__}: {exc}"),
                       reply_to=message)


def register_sharing(client_app: Any, bind: Callable[[Handler], Callable[[Message, Context], Message]],
                     overrides: Mapping[str, Any]) -> None:
    """Register the sharing handlers on ``client_app``: SecAgg+'s ``train`` messages, on a
    restarted node after its mirror is loaded (:func:`~flower_split.flower.tenant.restore_mod`), through
    the tenant's own rules (:mod:`~flower_split.flower.sharing_policy`) and Flower's
    ``secaggplus_mod`` (on this handler only), and ``train.share_load``; ``bind`` runs a handler
    all-or-nothing (:func:`flower_split.flower.tenant.handle`); ``overrides``: run-config values
    that take precedence (tests)."""
    client_app.train(mods=[error_reply_mod, restore_mod(overrides), sharing_policy_mod(overrides),
                           secaggplus_mod])(bind(share_fit))
    category, action = split_type(MessageType.SHARE_LOAD)
    getattr(client_app, category)(action)(bind(share_load))
