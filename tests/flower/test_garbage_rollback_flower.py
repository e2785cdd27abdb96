"""Over Flower: a failed truncation in a secure tenant's weight gradient costs it that round, not the run.

The review of a 10-tenant secure run (docs/BENCHMARKS.md, "Secure sharing at the headline learning
rates") saw one tenant refused for an out-of-range ``dL/dh`` in round 1 and again at the first step
of round 2: rolling back the refused step alone had kept the garbage an earlier step wrote into the
halves. Here the cloud's division of a classifier gradient fails for real (off by 2^(64 - bits), what
a wrap of the shares does); the tenant's next step opens out-of-range logits, its node refuses them
with the out-of-range error code, the strategy drops it and the cloud undoes both steps; at the next
round both parties reconcile to the model before the failure and the tenant trains again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.strategy_utils import RoundReport
from flower_helpers import LocalGrid

share_module = importlib.import_module("flower_split.mpc.share")

SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 96, "max-test-samples": 16,
          "local-steps": 3, "num-server-rounds": 2, "eval-every": 0, "min-nodes": 2, "reply-timeout": 60.0,
          "security": "secure", "label-protection": "client", "global-eval": False}
CLASSIFIER = (32, 77)  # cls.Wc of the tiny model: its gradient's shape


@pytest.mark.parametrize("undo_previous", [True, False])
def test_a_failed_truncation_costs_the_tenant_one_round_not_the_run(
        undo_previous: bool, task_identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truncate = share_module.AdditiveShare.truncate
    failed = []

    def failing(self, bits):  # the cloud's first classifier-gradient division wraps
        result = truncate(self, bits)
        if bits and self.party == 0 and tuple(self.shape) == CLASSIFIER and not failed:
            result.data.view(-1)[0] += 1 << (64 - bits - 1) << 1
            failed.append(bits)
        return result

    monkeypatch.setattr(share_module.AdditiveShare, "truncate", failing)
    if not undo_previous:  # the behaviour before rollback points: only the refused step is undone
        monkeypatch.setattr(SecureSplitStrategy, "forget_step",
                            lambda self, tenant, garbage=False: self.cloud.abort_step(tenant))
    reports: list = []
    run_cloud(LocalGrid(make_client_app(SECURE), 2, dealer=tmp_path), SECURE, reports.append)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert failed and len(rounds) == 2
    (victim, reason), = rounds[0].dropped.items()
    assert "out of range" in reason and "open.z" in reason
    if undo_previous:
        assert rounds[1].dropped == {} and sorted(rounds[1].tenants) == ["tenant-0", "tenant-1"]
    else:  # the garbage outlives the refused step: the tenant is refused again at its next step
        assert victim in rounds[1].dropped and "out of range" in rounds[1].dropped[victim]


def test_a_failed_truncation_just_before_a_sharing_phase_does_not_outlive_the_next_round(
        task_identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure in the last training step of round 1, then the sharing phase (a hostile review:
    the mean's mod-2^31 lift turned the garbage into an in-range value, the load cleared the
    rollback points and kept the garbage momentum, and the tenant was refused every later round).
    Now the cloud refuses a mean out of range (most such failures) and the load restarts the loaded
    parameters' momentum; either way the tenants train in round 3 again."""
    config = {**SECURE, "share": "all", "num-server-rounds": 3, "local-steps": 2, "max-train-samples": 192}
    truncate = share_module.AdditiveShare.truncate
    state = {"train_steps": 0, "failed": 0}

    def failing(self, bits):  # the cloud's first classifier-gradient division of round 1's last step wraps
        result = truncate(self, bits)
        if state["train_steps"] == 2 and bits and self.party == 0 and tuple(self.shape) == CLASSIFIER \
                and not state["failed"]:
            result.data.view(-1)[0] += 1 << (64 - bits - 1) << 1
            state["failed"] = 1
        return result

    run_steps = SecureSplitStrategy._run_steps

    def counting(self, grid, train, *args, **kwargs):
        state["train_steps"] += bool(train)
        return run_steps(self, grid, train, *args, **kwargs)

    monkeypatch.setattr(share_module.AdditiveShare, "truncate", failing)
    monkeypatch.setattr(SecureSplitStrategy, "_run_steps", counting)
    reports: list = []
    grid = LocalGrid(make_client_app(config), 3, dealer=tmp_path, node_config={"share-min-tenants": 3},
                     sharing_keys=tmp_path / "share")
    run_cloud(grid, config, reports.append)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert state["failed"] and len(rounds) == 3
    assert rounds[0].dropped == {}
    assert len(rounds[1].dropped) <= 1 and all("out of range" in why for why in rounds[1].dropped.values())
    assert rounds[2].dropped == {} and len(rounds[2].tenants) == 3


@pytest.mark.parametrize("undo_in_evaluation", [False, True])
def test_a_refused_evaluation_batch_undoes_no_training_step(
        undo_in_evaluation: bool, task_identity: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed truncation in an evaluation step (the cloud's first division of it wraps, so the
    head output it opens is ~2^32): the tenant is dropped from that evaluation, and its model keeps
    every training step (a hostile review: the drop undid the last one). The control undoes a
    step on any refusal, as before the fix, and loses one."""
    from flower_split.flower.dealer_link import NodeDealer
    from flower_split.model import load_encoder, split_encoder
    from flower_split.protocol.secure_cloud import SecureCloudParty

    truncate = share_module.AdditiveShare.truncate
    state = {"evaluating": False, "failed": 0}

    def failing(self, bits):
        result = truncate(self, bits)
        if state["evaluating"] and bits and self.party == 0 and not state["failed"]:
            result.data.view(-1)[0] += 1 << (64 - bits - 1) << 1
            state["failed"] = 1
        return result

    run_steps = SecureSplitStrategy._run_steps

    def marking(self, grid, train, *args, **kwargs):
        state["evaluating"] = not train
        return run_steps(self, grid, train, *args, **kwargs)

    monkeypatch.setattr(share_module.AdditiveShare, "truncate", failing)
    monkeypatch.setattr(SecureSplitStrategy, "_run_steps", marking)
    if undo_in_evaluation:  # the behaviour before the fix: any garbage refusal undoes a training step
        monkeypatch.setattr(SecureSplitStrategy, "forget_step",
                            lambda self, tenant, garbage=False: self.cloud.abort_step(tenant, undo_previous=garbage))
    config = {**SECURE, "eval-every": 1}
    _, body = split_encoder(load_encoder("tiny", seed=0))
    strategy = SecureSplitStrategy(SecureCloudParty(body, None), NodeDealer(60.0), local_steps=3,
                                   reply_timeout=60.0, global_eval=False)
    reports: list = []
    strategy.start(LocalGrid(make_client_app(config), 2, dealer=tmp_path), 2, eval_every=1, on_report=reports.append)
    evaluations = [r for r in reports if not isinstance(r, RoundReport)]
    assert state["failed"] and any("out of range" in why for r in evaluations for why in r.dropped.values())
    updates = sorted(strategy.cloud.counts(t)["tail"] for t in strategy.cloud.tenants)  # 2 rounds of 3 steps
    assert updates == ([5, 6] if undo_in_evaluation else [6, 6])
