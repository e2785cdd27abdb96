"""Settings of the FedAvg-LoRA family of baselines (FedAvg, FedProx, local-only, personalised).

``run_config`` keys (dashes or underscores), besides :class:`RunConfig` and
:class:`FlowerSettings`:

``baseline``            ``fedavg`` (Flower's ``FedAvg``), ``fedprox`` (Flower's ``FedProx``: the
                        clients add ``proximal-mu / 2 * ||w - w_global||^2`` to their loss) or
                        ``local-only`` (every tenant trains its own model on its own rows; nothing
                        is averaged and no tenant's weights leave it). Default ``fedavg``.
``local-epochs``        passes over the tenant's partition per round (default 1).
``proximal-mu``         FedProx's mu (>= 0; ``fedprox`` only; 0 is FedAvg).
``plateau-patience``    stop once the per-tenant accuracy has not improved by more than
                        ``plateau-delta`` over its best for this many evaluations (0: run all
                        ``num-server-rounds``, which is then the maximum). Default 0.
``plateau-delta``       the improvement that counts, as a fraction (default 0.002: 0.2 points).
``personalize-epochs``  after the last round, every tenant fine-tunes the final global model for
                        this many epochs on its own rows and is evaluated with that model, which
                        never leaves it (personalised FedAvg; 0: off; not with ``local-only``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from flower_split.config import ConfigError, RunConfig
from flower_split.flower.settings import FlowerSettings, settings_from_run_config

BASELINES = ("fedavg", "fedprox", "local-only")
RUN_NAMES = {"fedavg": "fedavg-lora", "fedprox": "fedprox-lora", "local-only": "local-lora"}


def _count(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        word = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name}: expected {word}, got {value!r}")


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{name}: expected a finite number >= 0, got {value!r}")


@dataclass
class FedAvgSettings:
    """The FedAvg-family settings that are neither :class:`RunConfig` nor :class:`FlowerSettings`."""

    local_epochs: int = 1
    baseline: str = "fedavg"
    proximal_mu: float = 0.0
    plateau_patience: int = 0
    plateau_delta: float = 0.002
    personalize_epochs: int = 0

    def validate(self) -> "FedAvgSettings":
        _count("local-epochs", self.local_epochs, 1)
        if self.baseline not in BASELINES:
            raise ConfigError(f"baseline: expected one of {BASELINES}, got {self.baseline!r}")
        _number("proximal-mu", self.proximal_mu)
        if self.proximal_mu and self.baseline != "fedprox":
            raise ConfigError(f"proximal-mu: only the fedprox baseline has a proximal term "
                              f"(baseline is {self.baseline!r})")
        _count("plateau-patience", self.plateau_patience, 0)
        _number("plateau-delta", self.plateau_delta)
        _count("personalize-epochs", self.personalize_epochs, 0)
        if self.personalize_epochs and self.baseline == "local-only":
            raise ConfigError("personalize-epochs: local-only tenants already train on their own rows only")
        return self

    @property
    def run_name(self) -> str:
        return RUN_NAMES[self.baseline]


FEDAVG_FIELDS = frozenset(f.name for f in dataclasses.fields(FedAvgSettings))


def fedavg_settings_from_run_config(values: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings, FedAvgSettings]:
    """Split ``run_config`` into RunConfig, FlowerSettings and FedAvgSettings (all validated)."""
    ours: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in FEDAVG_FIELDS:
            ours[name] = value
        else:
            rest[key] = value
    config, settings = settings_from_run_config(rest)
    return config, settings, FedAvgSettings(**ours).validate()
