"""Secure split training through the public API: config, a quick run that learns, the report."""

from __future__ import annotations

import pytest

from flower_split.api import train
from flower_split.backends import backend_for
from flower_split.config import ConfigError, RunConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quick(mode: str, **overrides) -> RunConfig:
    values = dict(model="tiny", mode="split", security="secure", label_protection=mode, epochs=6, batch_size=16,
                  max_train_samples=64, max_test_samples=32, max_length=16, head_rank=8, tail_bottleneck=16,
                  lr_head=0.05, lr_tail=0.3, device="cpu")
    values.update(overrides)
    return RunConfig(**values)


def test_secure_config_is_accepted_and_checked() -> None:
    backend = backend_for(RunConfig(security="secure").validate())
    assert backend.name == "secure"
    with pytest.raises(ConfigError, match="^optimizer:"):
        backend.validate(RunConfig(security="secure", optimizer="adamw").validate())
    with pytest.raises(ConfigError, match="^optimizer:"):  # every entry point asks the backend first
        train(_quick("client", optimizer="adamw", epochs=1, max_train_samples=16), progress=False)
    with pytest.raises(ConfigError, match="^activation:"):
        train(_quick("client", activation="gelu", epochs=1, max_train_samples=16), progress=False)
    backend_for(RunConfig(optimizer="adamw", activation="gelu").validate())  # plain takes both


@pytest.mark.parametrize("mode, epochs", [("client", 6), ("he", 3)])
def test_quick_secure_run_lowers_the_loss(mode: str, epochs: int) -> None:
    run = train(_quick(mode, epochs=epochs), progress=False)
    history = run["train_loss_history"]
    assert run["security"] == "secure" and run["label_protection"] == mode
    assert history[-1] < history[0] - (0.3 if epochs >= 6 else 0.15), history
    assert run["rounds_per_step"] == 9  # client messages per step, both modes (held inputs: no seeds to wait for)
    assert run["bytes_per_step_client_to_cloud"] > 0 and run["bytes_per_step_cloud_to_client"] > 0
    assert run["bytes_dealer_to_cloud"] > 0
    assert 0.0 <= run["test_accuracy"] <= 1.0
