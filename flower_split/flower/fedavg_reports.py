"""What the FedAvg-family strategies report per round, and the plateau stop rule."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FedAvgRoundReport:
    """One training round."""

    server_round: int
    tenants: list[str]
    failures: dict[str, str]
    train_loss: float | None
    num_examples: int
    per_tenant_loss: dict[str, float]
    steps: dict[str, int]
    wall_seconds: float

    @property
    def round_trips_per_step(self) -> float:
        """One train round trip per round, over the mean optimizer steps a tenant took in it."""
        mean_steps = sum(self.steps.values()) / len(self.steps) if self.steps else 0.0
        return 1.0 / mean_steps if mean_steps else 0.0


@dataclass
class FedAvgEvalReport:
    """A model on each tenant's own test split (example-weighted means over tenants)."""

    server_round: int
    accuracy: float | None
    macro_f1: float | None
    per_tenant: dict[str, float]
    per_tenant_f1: dict[str, float]
    num_examples: dict[str, int]
    failures: dict[str, str]
    wall_seconds: float


@dataclass
class PersonalizedEvalReport(FedAvgEvalReport):
    """After the last round: each tenant's fine-tuned copy of the final global model on its test split."""

    epochs: int = 0
    train_examples: dict[str, int] = field(default_factory=dict)


@dataclass
class GlobalEvalReport:
    """The global model on the whole (sampled) test set, evaluated by the ServerApp."""

    server_round: int
    accuracy: float
    macro_f1: float
    num_examples: int


@dataclass
class FedAvgHistory:
    rounds: list[FedAvgRoundReport] = field(default_factory=list)
    evaluations: list[FedAvgEvalReport] = field(default_factory=list)
    global_evaluations: list[GlobalEvalReport] = field(default_factory=list)
    personalized: PersonalizedEvalReport | None = None
    stopped_after: int | None = None  # the round after which the plateau rule stopped the run


Report = FedAvgRoundReport | FedAvgEvalReport | GlobalEvalReport


class PlateauStop:
    """Stop once per-tenant accuracy has not beaten its best by more than ``min_delta`` for
    ``patience`` evaluations in a row (``patience`` 0: never stop)."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.since_best = 0

    def update(self, accuracy: float | None) -> bool:
        """Record one evaluation's per-tenant accuracy; True when the run should stop after it."""
        if accuracy is None:  # no tenant evaluated: no evidence either way
            return False
        if self.best is None or accuracy > self.best + self.min_delta:
            self.best, self.since_best = accuracy, 0
        else:
            self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience
