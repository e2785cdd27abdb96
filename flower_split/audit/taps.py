"""Taps that feed a :class:`CloudViewRecorder` from a cloud party, without editing the party.

A tap wraps methods of one party *instance* (never the class), so the party's code and its
other instances are unchanged and the recording works under any transport that drives that
instance (in process, or a Flower ServerApp holding it):

* split-plain :class:`CloudParty`: every call of ``handle_many`` (``handle`` goes through it)
  records the ``HeadOutput`` and ``BodyGrad`` messages it answered;
* secure :class:`SecureCloudParty`: the script operations in which the cloud decodes a value
  opened to it (``body_forward``: ``f``; ``he_loss``: ``z``; ``body_backward``: ``dL/dh``) record
  the decoded value first, computed exactly as the party computes it from its own share and
  the opening it received.
"""

from __future__ import annotations

from typing import Any, Callable

from flower_split.audit.transcript import CloudViewRecorder
from flower_split.mpc import decode
from flower_split.protocol import CloudParty
from flower_split.protocol.secure_cloud import SecureCloudParty


def tap_cloud(cloud: CloudParty | SecureCloudParty, recorder: CloudViewRecorder) -> None:
    """Record everything ``cloud`` receives or decodes in the clear into ``recorder``."""
    if isinstance(cloud, SecureCloudParty):
        _tap_secure(cloud, recorder)
    elif isinstance(cloud, CloudParty):
        _tap_plain(cloud, recorder)
    else:
        raise TypeError(f"tap_cloud: expected a CloudParty or SecureCloudParty, got {type(cloud).__name__}")


def _tap_plain(cloud: CloudParty, recorder: CloudViewRecorder) -> None:
    handle_many = cloud.handle_many

    def recorded(messages: Any) -> Any:
        replies = handle_many(messages)  # a refused call raises: the cloud answered nothing
        recorder.record_pack(messages)
        return replies

    cloud.handle_many = recorded  # type: ignore[method-assign]


def _tap_secure(cloud: SecureCloudParty, recorder: CloudViewRecorder) -> None:
    def opened_f(st: Any, got: dict[str, Any]) -> None:
        f = cloud.opened_f(st, got)
        recorder.record_f(st.spec.tenant, st.spec.step, f, st.ctx["mask"], st.spec.train)

    def opened_z(st: Any, got: dict[str, Any]) -> None:
        z = decode(st.ctx["cls"].values["z"].data + got["open.z"], cloud.frac_bits)
        recorder.record_z(st.spec.tenant, st.spec.step, z)

    def opened_grad_h(st: Any, got: dict[str, Any]) -> None:
        scaled = decode(cloud._grad_h_share(st) + got["open.grad_h"], cloud.frac_bits)
        scale = 1 << cloud.tenants[st.spec.tenant].setup.grad_scale_bits  # public, from the set-up
        recorder.record_grad_h(st.spec.tenant, st.spec.step, scaled / scale)

    for name, record in (("body_forward", opened_f), ("he_loss", opened_z), ("body_backward", opened_grad_h)):
        setattr(cloud, f"_op_{name}", _before(getattr(cloud, f"_op_{name}"), record))


def _before(operation: Callable[..., Any], record: Callable[[Any, dict[str, Any]], None]) -> Callable[..., Any]:
    """``operation`` that first records what it is about to decode."""

    def recorded(st: Any, halves: Any, got: dict[str, Any]) -> Any:
        record(st, got)
        return operation(st, halves, got)

    return recorded
