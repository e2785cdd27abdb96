"""Sharing loads in secure mode: both parties count them on their halves (``Halves.loads``).

A sharing load (:mod:`flower_split.flower.sharing_server`) replaces some of a tenant's halves on
both sides, so both must make it or neither. Each side counts its loads and sends the count with
its update counts at every begin. The cloud is allowed to be one load behind: that is a load
whose acknowledgement it did not get, and it completes the load on its side when it reads the
tenant's count (:meth:`~flower_split.protocol.secure_cloud_tenant.CloudTenant.settle_load`). The
tenant never undoes a load: a tenant back on a model it has shared would let the cloud
difference two aggregates. Any other difference is refused before anything is opened.
"""

from __future__ import annotations

from flower_split.protocol.messages import ProtocolError


def peer_loads(counts: object, who: str) -> int:
    """The sharing-load count in a peer's ``counts`` (``Halves.counts``); ProtocolError if malformed."""
    try:
        value = counts["loads"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        raise ProtocolError(f"{who}: peer counts {counts!r} carry no sharing-load count") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{who}: peer sharing-load count {value!r} is not a count")
    return value


def check_cloud_loads(own: int, cloud_counts: object, who: str) -> None:
    """The tenant's side: the cloud's count must be this party's ``own`` or one fewer."""
    cloud = peer_loads(cloud_counts, who)
    if cloud not in (own, own - 1):
        raise ProtocolError(f"{who}: the cloud counts {cloud} sharing loads of the halves, this tenant made {own}; "
                            "the halves do not match, refusing to step")
