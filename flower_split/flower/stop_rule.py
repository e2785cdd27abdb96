"""The stop rule on the tenant: it stops training once its own loss reaches its target.

In secure mode the cloud sees no loss (a decrypted CKKS value in ``he`` mode, a
label-dependent number in ``client`` mode; docs/secure.md §9), nor in split-plain with
``secure-metrics`` false, so the tenant applies the rule itself, with a target only it
chooses: node config ``target-loss`` (0 or absent: never stop; a run config ``target-loss``
is refused in secure mode and in plain without the loss reports, since a target the cloud
picks would let it binary-search the tenant's loss). Secure tenants check it at a round's
training begin, plain tenants at a round's ``train.head_fwd``. It adds up the loss of every training step it
finishes (:func:`note_loss`) and, at a training begin of a new round once at least
:data:`MIN_WINDOW` of its own steps have been added up (:func:`stop_rule`), compares their
mean with the target; a window too short goes on into the next round, so the cloud cannot
make each step a window by numbering rounds. Once reached, it answers every training begin
with ``metrics`` {stopped: the round} and no step; the strategy stops sending it training
work and keeps evaluating it.

What the cloud learns: per window of at least :data:`MIN_WINDOW` steps, whether the tenant's
mean loss fell below its own target (a yes ends the training). A malicious cloud that shifts
its halves between windows can aim that bit at a guess about the labels; it is not counted in
any label-DP budget, so the rule is refused under Gaussian label-DP (``label_dp_noise``) and
stated in docs/STATE.md. The state lives in ``context.state`` under :data:`STOP_STATE`.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context

from flower_split.config import RunConfig
from flower_split.protocol import ProtocolError

STOP_STATE = "stop-rule"  # ConfigRecord {round, sum, count, stopped}
TARGET_CONFIG = "target-loss"
MIN_WINDOW = 10  # the tenant's own training steps a comparison averages over, at least


def tenant_target(context: Context, config: RunConfig) -> float:
    """The tenant's target: its node config ``target-loss``; 0: never stop."""
    value = context.node_config.get(TARGET_CONFIG, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ProtocolError(f"node config {TARGET_CONFIG}: expected a number >= 0, got {value!r}")
    if value and config.label_dp_noise:
        raise ProtocolError(f"node config {TARGET_CONFIG}: refused under label-DP (label_dp_noise): the stop bit "
                            "depends on the un-noised loss and is outside the privacy budget")
    return float(value)


def stop_rule(context: Context, config: RunConfig, server_round: int) -> int:
    """At a training begin of ``server_round``: the round the tenant stopped in, or 0 (train on)."""
    target = tenant_target(context, config)
    record = context.state.get(STOP_STATE)
    values = dict(record.items()) if isinstance(record, ConfigRecord) else \
        {"round": server_round, "sum": 0.0, "count": 0, "stopped": 0}
    if not values["stopped"] and values["round"] != server_round and values["count"] >= MIN_WINDOW:
        if target and values["sum"] / values["count"] <= target:
            values["stopped"] = values["round"]
        else:
            values.update({"sum": 0.0, "count": 0})
    if not values["stopped"]:
        values["round"] = server_round
    context.state[STOP_STATE] = ConfigRecord(values)
    return int(values["stopped"])


def note_loss(context: Context, loss: float) -> None:
    """Add a finished training step's own loss to the current window's sum."""
    record = context.state.get(STOP_STATE)
    if isinstance(record, ConfigRecord):
        values = dict(record.items())
        context.state[STOP_STATE] = ConfigRecord({**values, "sum": float(values["sum"]) + loss,
                                                  "count": int(values["count"]) + 1})
