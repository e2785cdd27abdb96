"""The stop rule on the tenant: it stops training once its own loss reaches its target.

In secure mode the cloud sees no loss (a decrypted CKKS value in ``he`` mode, a
label-dependent number in ``client`` mode; docs/secure.md §9), so the tenant applies the
rule itself: it adds up the loss of every training step it finishes in a round
(:func:`note_loss`) and, at its first training begin of a later round (:func:`stop_rule`),
compares that round's mean with its target: node config ``target-loss`` (the tenant's own
choice) or else run config ``target-loss``; 0: never stop. Once reached it answers every
training begin with ``metrics`` {stopped: the round} and no step; the strategy stops
sending it training work and keeps evaluating it.

What the cloud learns: one bit, once per run (the round in which the tenant's mean loss first
fell below its target), not the loss. The state lives in ``context.state`` under
:data:`STOP_STATE`, so it survives messages and, with ``state-dir``, restarts.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context

from flower_split.flower.settings import FlowerSettings
from flower_split.protocol import ProtocolError

STOP_STATE = "stop-rule"  # ConfigRecord {round, sum, count, stopped}
TARGET_CONFIG = "target-loss"


def tenant_target(context: Context, settings: FlowerSettings) -> float:
    """The tenant's target: its node config ``target-loss`` or the run's; 0: never stop."""
    value = context.node_config.get(TARGET_CONFIG, settings.target_loss)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ProtocolError(f"node config {TARGET_CONFIG}: expected a number >= 0, got {value!r}")
    return float(value)


def stop_rule(context: Context, settings: FlowerSettings, server_round: int) -> int:
    """At a training begin of ``server_round``: the round the tenant stopped in, or 0 (train on)."""
    target = tenant_target(context, settings)
    record = context.state.get(STOP_STATE)
    values = dict(record.items()) if isinstance(record, ConfigRecord) else \
        {"round": server_round, "sum": 0.0, "count": 0, "stopped": 0}
    if not values["stopped"] and values["round"] != server_round:
        if target and values["count"] and values["sum"] / values["count"] <= target:
            values["stopped"] = values["round"]
        else:
            values.update({"round": server_round, "sum": 0.0, "count": 0})
    context.state[STOP_STATE] = ConfigRecord(values)
    return int(values["stopped"])


def note_loss(context: Context, loss: float) -> None:
    """Add a finished training step's own loss to the current round's sum."""
    record = context.state.get(STOP_STATE)
    if isinstance(record, ConfigRecord):
        values = dict(record.items())
        context.state[STOP_STATE] = ConfigRecord({**values, "sum": float(values["sum"]) + loss,
                                                  "count": int(values["count"]) + 1})
