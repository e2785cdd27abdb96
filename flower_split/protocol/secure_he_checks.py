"""The cloud's checks of a tenant's CKKS material: a key rotation, and a step's labels envelope.

Both run before any state changes, so a refused rotation or envelope leaves the tenant's
keys and step as they were.
"""

from __future__ import annotations

from flower_split.he import CloudKeys
from flower_split.he.envelope import decode_labels
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_messages import KeyRotation
from flower_split.protocol.secure_steps import StepSpec


def check_key_rotation(rotation: KeyRotation, held: CloudKeys | None, label_protection: str,
                       step_in_flight: int | None) -> CloudKeys:
    """The rotated public CKKS keys, after checking them against the keys the cloud ``held``.

    A tenant with CKKS keys and no step in flight; the rotation starts from the key the cloud
    holds (a stale or replayed rotation does not); public key material only (a secret key is
    refused); same HE parameters; the announced key id is the material's.
    """
    where = f"key rotation (tenant {rotation.tenant!r})"
    if held is None:
        raise ProtocolError(f"{where}: label protection {label_protection!r} has no CKKS keys")
    if step_in_flight is not None:
        raise ProtocolError(f"{where}: step {step_in_flight} is in flight; rotate between steps")
    if not all(isinstance(v, bytes) for v in (rotation.previous_key_id, rotation.key_id, rotation.he_public)):
        raise ProtocolError(f"{where}: previous_key_id, key_id and he_public must be bytes")
    if rotation.previous_key_id != held.key_id:
        raise ProtocolError(f"{where}: it replaces key {rotation.previous_key_id.hex()}, but the cloud holds "
                            f"{held.key_id.hex()} (stale or replayed rotation)")
    try:
        keys = CloudKeys.from_bytes(rotation.he_public)
    except ValueError as exc:
        raise ProtocolError(f"{where}: he_public: {exc}") from exc
    if keys.key_id != rotation.key_id:
        raise ProtocolError(f"{where}: key_id {rotation.key_id.hex()} is not the id of he_public "
                            f"({keys.key_id.hex()})")
    if keys.key_id == held.key_id:
        raise ProtocolError(f"{where}: he_public is the key the cloud already holds")
    if keys.params != held.params:
        raise ProtocolError(f"{where}: a rotation keeps the HE parameters; got {keys.params}, "
                            f"set up with {held.params}")
    return keys


def check_labels_key(keys: CloudKeys, spec: StepSpec, items: object) -> None:
    """ValueError unless a training step's labels envelope is under ``keys`` and fits the batch.

    Run on the step's first message, before the dealer is asked or any state changes, so a
    client still encrypting under a rotated-out key is told at once. A missing or mistyped
    item is left to the schedule check of :meth:`SecureCloudParty.handle`, which names it.
    """
    labels = items.get("input.labels") if isinstance(items, dict) else None
    if not isinstance(labels, bytes):
        return
    envelope = decode_labels(labels, key_id=keys.key_id, degree=keys.params.poly_modulus_degree)
    if (envelope.batch_size, envelope.num_classes) != (spec.batch, spec.classes):
        raise ValueError(f"labels envelope: a {envelope.batch_size}x{envelope.num_classes} batch, "
                         f"the step is {spec.batch}x{spec.classes}")
