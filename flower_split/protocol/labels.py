"""The registry of label protections: how a secure step's loss is computed without exposing labels.

Each protection is one :class:`LabelProtection` whose fields say what it needs and what it
shows; the secure parties ask these fields, never compare names (docs/ARCHITECTURE.md:
"add a label protection").

``he``      the patent's protocol: the tenant sends its labels under its own CKKS key, the
            cloud computes the loss and the masked gradient on ciphertexts. The tenant holds
            CKKS keys (rotatable); the logits ``z`` are opened to the cloud.
``client``  the logits are opened to the tenant only, which computes the loss and gradient
            locally and shares the gradient. No CKKS; the cloud sees no predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

from flower_split.config import LABEL_PROTECTIONS, ConfigError


@dataclass(frozen=True)
class LabelProtection:
    """What a label protection needs and what it reveals."""

    name: str
    ckks_keys: bool         # the tenant holds CKKS keys: generated at set-up, sent as a public context, rotatable
    logits_to_cloud: bool   # training opens the logits z to the cloud (a documented leak point)
    summary: str


PROTECTIONS: dict[str, LabelProtection] = {p.name: p for p in (
    LabelProtection("he", ckks_keys=True, logits_to_cloud=True,
                    summary="CKKS-encrypted labels; the cloud computes the loss on ciphertexts and sees z"),
    LabelProtection("client", ckks_keys=False, logits_to_cloud=False,
                    summary="logits opened to the tenant only; the loss is computed on the tenant"),
)}
if tuple(PROTECTIONS) != LABEL_PROTECTIONS:
    raise ImportError(f"label protections {tuple(PROTECTIONS)} do not match config.LABEL_PROTECTIONS")


def label_protection(name: str) -> LabelProtection:
    """The protection registered under ``name`` (ConfigError naming the choices otherwise)."""
    try:
        return PROTECTIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"label_protection: expected one of {tuple(PROTECTIONS)}, got {name!r}") from None
