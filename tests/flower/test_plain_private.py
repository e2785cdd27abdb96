"""The private preset's label protection under split-plain (node config ``private``).

Against the cloud, split-plain with a frozen head and no reports shows what secure mode's
private preset shows (docs/PRIVACY.md, "Secure mode against split-plain"). The attack: with
one example per evaluation message, the per-class counts a plain tenant reports name that
example's label, and the per-pack training loss measures the tail's fit. Each test runs the
real ClientApp and strategy and reads every reply the cloud receives.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message, MetricRecord

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.contract import MessageType, MetricKey, RecordKey
from flower_split.flower.records import unpack_messages
from flower_split.protocol import BodyGrad
from flower_helpers import LocalGrid

RUN = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
       "batch-size": 1, "max-length": 16, "max-train-samples": 16, "max-test-samples": 24, "local-steps": 3,
       "micro-batches": 1, "num-server-rounds": 1, "min-nodes": 1, "global-eval": False}
PRIVATE_PLAIN = {**RUN, "train-head": False, "secure-metrics": False}
# what a private tenant may report: counts the cloud knows anyway, and its own stop bit
ALLOWED = {MetricKey.NUM_EXAMPLES, MetricKey.REMAINING, MetricKey.STEPS, MetricKey.STOPPED}


class RecordingGrid(LocalGrid):
    """A one-tenant grid that keeps every reply the cloud receives, by message type."""

    def __init__(self, run: dict, node_config: dict | None = None) -> None:
        super().__init__(make_client_app(run), 1, node_config=node_config)
        self.replies: list[tuple[str, Message]] = []

    def deliver(self, message: Message) -> Message | None:
        reply = super().deliver(message)
        if reply is not None:
            self.replies.append((message.metadata.message_type, reply))
        return reply


def _labels_read_from_counts(grid: RecordingGrid) -> list[int]:
    """The attack: one example per evaluation reply, so ``tp + fn`` is one-hot at its label."""
    labels = []
    for kind, reply in grid.replies:
        metrics = reply.content.get(RecordKey.METRICS) if not reply.has_error() else None
        if kind == MessageType.INFER_TAIL and isinstance(metrics, MetricRecord) and MetricKey.TP in metrics:
            support = [tp + fn for tp, fn in zip(metrics[MetricKey.TP], metrics[MetricKey.FN])]
            assert sum(support) == 1  # a batch of one: exactly one class has an example
            labels.append(support.index(1))
    return labels


def _label_dependent_values(grid: RecordingGrid) -> list[str]:
    """Every value among the replies beyond :data:`ALLOWED` counts: other metrics and ``dL/dh``."""
    found = []
    for kind, reply in grid.replies:
        assert not reply.has_error(), reply.error
        metrics = reply.content.get(RecordKey.METRICS)
        if isinstance(metrics, MetricRecord):
            found += [f"{kind}: {key}" for key in metrics if key not in ALLOWED]
        if kind == MessageType.TAIL:
            found += [f"{kind}: dL/dh of step {g.step}" for g in unpack_messages(reply.content, BodyGrad, "tenant-0")]
    return found


def test_the_attack_reads_labels_and_losses_from_a_default_plain_run(task_identity: None) -> None:
    grid = RecordingGrid(RUN)
    reports: list = []
    run_cloud(grid, RUN, reports.append)
    evaluated = sum(reports[-1].num_examples.values())
    assert evaluated >= 2 and len(_labels_read_from_counts(grid)) == evaluated  # every test example's label
    found = _label_dependent_values(grid)
    assert any(MetricKey.TRAIN_LOSS in f for f in found) and any("dL/dh" in f for f in found)
    assert reports[-1].accuracy is not None


@pytest.mark.parametrize("node_private", [False, True])
def test_plain_with_a_frozen_head_and_no_reports_shows_the_cloud_nothing_label_dependent(
        task_identity: None, node_private: bool) -> None:
    grid = RecordingGrid(PRIVATE_PLAIN, {"private": True} if node_private else None)
    reports: list = []
    run_cloud(grid, PRIVATE_PLAIN, reports.append)
    assert _labels_read_from_counts(grid) == [] and _label_dependent_values(grid) == []
    kinds = [kind for kind, _ in grid.replies]
    assert kinds.count(MessageType.TAIL) == 3 and MessageType.HEAD_BWD not in kinds  # it trained, no head step
    train, evaluation = reports[0], reports[-1]
    assert train.train_loss is None and train.num_examples == 3 and not train.dropped
    assert evaluation.accuracy is None and not evaluation.dropped  # the tenant kept its counts


def test_a_private_node_refuses_a_plain_run_that_reports_or_trains_the_head(task_identity: None) -> None:
    for run in ({**PRIVATE_PLAIN, "secure-metrics": True}, {**PRIVATE_PLAIN, "train-head": True}):
        grid = RecordingGrid(run, {"private": True})
        reports: list = []
        run_cloud(grid, run, reports.append)
        assert reports[0].dropped and reports[0].num_examples == 0 and reports[-1].accuracy is None
        errors = [reply.error.reason for _, reply in grid.replies if reply.has_error()]
        assert errors and all("private = true accepts only plain runs" in e for e in errors)
        assert not any(not reply.has_error() for _, reply in grid.replies)  # nothing answered


def test_target_loss_is_refused_when_plain_tenants_keep_their_losses() -> None:
    from flower_split.backends import backend_for
    from flower_split.config import ConfigError
    from flower_split.flower.settings import settings_from_run_config

    with pytest.raises(ConfigError, match="^target-loss: with secure-metrics = false"):
        backend_for(*settings_from_run_config({**PRIVATE_PLAIN, "target-loss": 1.0}))


def test_a_plain_tenant_applies_its_own_stop_rule_and_reports_only_the_round(task_identity: None) -> None:
    """Without loss reports the cloud cannot stop a tenant; the tenant's node config target-loss
    does, after a window of at least MIN_WINDOW of its own steps, and the cloud learns one bit."""
    from flower_split.flower.stop_rule import MIN_WINDOW

    run = {**PRIVATE_PLAIN, "local-steps": MIN_WINDOW, "micro-batches": 5, "num-server-rounds": 3, "eval-every": 0}
    for target, stopped in ((1e6, {"tenant-0": 1}), (1e-9, {})):  # any loss reaches the first, none the second
        grid = RecordingGrid(run, {"private": True, "target-loss": target})
        reports: list = []
        run_cloud(grid, run, reports.append)
        train = [r for r in reports if type(r).__name__ == "RoundReport"]
        assert [r.num_examples for r in train] == ([MIN_WINDOW, 0, 0] if stopped else [MIN_WINDOW] * 3)
        assert train[-1].stopped == stopped and all(r.train_loss is None for r in train)
        assert _label_dependent_values(grid) == []



def _probe_replies(run: dict, node_config: dict | None, scale: float, examples: int = 4) -> list[Message]:
    """A malicious cloud's probe: for each of ``examples`` training steps, instead of the body's
    output it sends ``h = scale * s`` for a fixed sign vector ``s`` (finite, so it passes the
    tenant's checks), and keeps the tenant's reply."""
    from dataclasses import replace

    from flwr.app import ConfigRecord, Context, RecordDict

    from flower_split.flower.records import pack_messages
    from flower_split.model import build_split
    from flower_split.protocol import BodyOutput, CloudParty, HeadOutput

    app = make_client_app(run)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1, **(node_config or {})},
                      state=RecordDict(), run_config={})
    cloud = CloudParty(build_split("tiny", 77, 4, 8).body)
    signs = None
    replies = []
    for index in range(examples):
        config = {"num-batches": 1, "server-round": 1, "known": index > 0}
        head = app(Message(RecordDict({RecordKey.CONFIG: ConfigRecord(config)}), 1, MessageType.HEAD_FWD), context)
        assert not head.has_error(), head.error
        (output,) = [cloud.handle(h) for h in unpack_messages(head.content, HeadOutput, "tenant-0")]
        if signs is None:
            signs = torch.where(torch.arange(output.h.numel()) % 3 == 0, -1.0, 1.0).reshape(output.h.shape)
        crafted = replace(output, h=scale * signs)
        replies.append(app(Message(pack_messages(BodyOutput, "tenant-0", [crafted]), 1, MessageType.TAIL), context))
    return replies


def test_a_crafted_h_gets_the_same_reply_whatever_the_loss(task_identity: None) -> None:
    """Two hostile reviews: a finite h can make the loss finite for some labels and not for others
    (CE([1e38, -inf], y) is 0 or inf). The tenant refused a step whose loss was not finite and
    rolled back, so the cloud could ask again and again; and under label-DP it counted a label's
    use only when the tail's backward ran, so the epsilon it reports said the same. Where the loss
    stays on the tenant (no reports, or label-DP) every reply is now the same for any h."""
    undefended = _probe_replies({**PRIVATE_PLAIN, "secure-metrics": True}, None, 3e38)
    assert any(r.has_error() and "training diverged" in r.error.reason for r in undefended)  # the oracle
    label_dp = {"label-dp-noise": 1.0, "label-dp-delta": 1e-6}
    for run, node, keys in ((PRIVATE_PLAIN, None, {MetricKey.NUM_EXAMPLES}),
                            (PRIVATE_PLAIN, {"private": True}, {MetricKey.NUM_EXAMPLES}),
                            ({**PRIVATE_PLAIN, **label_dp}, {"private": True}, {MetricKey.NUM_EXAMPLES, MetricKey.LABEL_DP_EPSILON}),
                            ({**PRIVATE_PLAIN, **label_dp, "secure-metrics": True}, None,
                             {MetricKey.NUM_EXAMPLES, MetricKey.LABEL_DP_EPSILON})):
        seen = []
        for scale in (3e38, 1.0):  # non-finite logits or losses, and ordinary steps
            replies = _probe_replies(run, node, scale)
            assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
            for reply in replies:
                assert set(reply.content[RecordKey.METRICS].keys()) == keys
                assert reply.content[RecordKey.METRICS][MetricKey.NUM_EXAMPLES] == 1
                assert unpack_messages(reply.content, BodyGrad, "tenant-0") == []
            seen.append([dict(r.content[RecordKey.METRICS].items()) for r in replies])
        assert seen[0] == seen[1]  # the epsilon too: a use counts when the step begins
