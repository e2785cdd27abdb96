"""Opt-in cross-tenant sharing under Flower's SecAgg+ (flower.sharing_*): plain and secure.

The strategies, ClientApps, Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` are the
real ones; the network is the in-process grid of the other Flower tests.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

import flower_split.apps.server_app as server_app
from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud, run_recorded
from flower_split.config import ConfigError
from flower_split.flower.dealer_link import NodeDealer
from flower_split.flower.plain_handlers import PARTY_ARRAYS, PARTY_CONFIG
from flower_split.flower.context_state import records_to_state
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.sharing_params import (
    RING_MOD, SECURE_QUANTIZATION, average_half, decode_sum, encode_half, lift_tenant_sum, ring_sum,
)
from flower_split.flower.sharing_policy import (
    POLICY_STATE, check_changed_since_load, note_begin, note_load, note_loaded_halves,
)
from flower_split.flower.sharing_server import SecAggSharing, make_sharing
from flower_split.flower.strategy_utils import RoundReport
from flower_split.mpc import decode, encode
from flower_split.model import load_encoder, split_encoder
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_helpers import LocalGrid

PLAIN = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
         "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 192, "max-test-samples": 64,
         "local-steps": 2, "micro-batches": 2, "num-server-rounds": 1, "min-nodes": 3, "reply-timeout": 120.0,
         "global-eval": False, "eval-every": 0}
SECURE = {**PLAIN, "security": "secure", "label-protection": "client", "min-nodes": 2}
THREE = {"share-min-tenants": 3}  # the tenants' floor (default 4): these tests share among 3
UNPINNED = {**THREE, "allow-unpinned-sharing": True}  # no sharing keys: a semi-honest cloud is trusted


class Recording(SecAggSharing):
    """The sharing phase, with a look at every tenant's parameters before and after it and at
    what the cloud's side receives."""

    def __init__(self, grid: LocalGrid, *args: Any) -> None:
        super().__init__(*args)
        self.grid, self.strategy = grid, None
        self.rounds: dict[int, tuple[dict, dict]] = {}  # round -> (before, after)

    @property
    def before(self) -> dict:
        return self.rounds[1][0]

    @property
    def after(self) -> dict:
        return self.rounds[1][1]

    def __call__(self, strategy: Any, grid: Any, server_round: int, tenants: list[str], final: bool = False) -> Any:
        self.strategy = strategy
        before = {n: self.snapshot(strategy, n) for n in self.grid.contexts if n in strategy.tenant_of}
        report = super().__call__(strategy, grid, server_round, tenants, final=final)
        self.rounds[server_round] = (before, {n: self.snapshot(strategy, n) for n in before})
        return report

    def snapshot(self, strategy: Any, node: int) -> dict[str, torch.Tensor]:
        state = self.grid.contexts[node].state
        if self.security == "plain":
            party = records_to_state(state[PARTY_ARRAYS], state[PARTY_CONFIG])
            return {f"{part}.{k}": v.clone() for part in ("head", "tail") for k, v in party[part].items()}
        client = records_to_state(state["secure.arrays"], state["secure.config"])["halves"]["weights"]
        cloud = strategy.cloud.export_halves(strategy.tenant_of[node])
        return {**{f"client/{k}": v.clone() for k, v in client.items()}, **{f"cloud/{k}": v for k, v in cloud.items()}}


class Spying(LocalGrid):
    """LocalGrid that keeps every reply the cloud received from a tenant in the sharing phase."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Any] = []

    def deliver(self, message: Any) -> Any:
        reply = super().deliver(message)
        if message.metadata.message_type in ("train", "train.share_load") and reply is not None:
            self.seen.append(reply)
        return reply


def test_share_setting_is_checked() -> None:
    assert settings_from_run_config(PLAIN)[1].share == "none" and make_sharing("plain", "none", 0.5, 1.0) is None
    with pytest.raises(ConfigError, match="^share: expected one of none, tail, head-tail"):
        settings_from_run_config({**PLAIN, "share": "classifier"})
    with pytest.raises(ConfigError, match="^share-threshold"):
        settings_from_run_config({**PLAIN, "share-threshold": 0})
    with pytest.raises(ConfigError, match="shares after every round but the last"):
        settings_from_run_config({**PLAIN, "share": "all", "num-server-rounds": 1})


def test_halves_pass_secagg_encoding_exactly_and_the_averages_add_up() -> None:
    gen = torch.Generator().manual_seed(0)
    x = [encode(torch.randn(5, 3, generator=gen) * 3) for _ in range(3)]  # three tenants' adapters
    cloud = [torch.randint(-2**63, 2**63 - 1, (5, 3), generator=gen, dtype=torch.int64) for _ in x]
    tenant = [a - b for a, b in zip(x, cloud)]  # int64 wraps: additive shares in Z_2^64
    encoded = [encode_half(t) for t in tenant]
    clip, total = SECURE_QUANTIZATION["clipping_range"], SECURE_QUANTIZATION["quantization_range"]
    assert all(((e + clip) == np.round(e + clip)).all() and (e + clip).max() < RING_MOD for e in encoded)
    # what the workflow's dequantization hands aggregate_fit, for a modulo-2^31 sum R of the q's
    r = np.mod(sum(e + clip for e in encoded), RING_MOD)
    factor = (3 * total) % RING_MOD
    aggregate = (r - 3 * clip) * total / factor
    tenant_sum = lift_tenant_sum(decode_sum(aggregate, 3), ring_sum(cloud))
    assert torch.equal(tenant_sum, ring_sum(tenant))  # the full Z_2^64 sum, from its residue mod 2^31
    mean = average_half(tenant_sum, 3, 1, 16) + average_half(ring_sum(cloud), 3, 0, 16)
    assert (decode(mean) - decode(ring_sum(x)) / 3).abs().max() <= 2 * 2.0 ** -16


def _plain_run(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], grid: LocalGrid) -> tuple[Recording, list]:
    sharing: list[Recording] = []

    def make(security: str, scope: str, threshold: float, timeout: float | None) -> Recording | None:
        sharing.append(Recording(grid, security, scope, threshold, timeout))
        return sharing[-1]

    monkeypatch.setattr(server_app, "make_sharing", make)
    reports: list = []
    run_cloud(grid, config, reports.append)
    return sharing[0], [r for r in reports if isinstance(r, RoundReport)]


@pytest.mark.parametrize("scope", ["tail", "head-tail"])
def test_plain_sharing_averages_the_shared_parameters_only(scope: str, task_identity: None, tmp_path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = {**PLAIN, "share": scope}
    grid = Spying(make_client_app(config), 3, node_config=THREE, sharing_keys=tmp_path)  # pinned, as deployed
    sharing, rounds = _plain_run(monkeypatch, config, grid)
    report = rounds[0].sharing
    assert report.tenants == ["tenant-0", "tenant-1", "tenant-2"] and not report.dropped
    assert report.round_trips == 6 and report.threshold == 2  # 4 SecAgg+ stages, the consistency stage, the load
    shared = {"tail.adapter.down.weight", "tail.adapter.up.weight"} | (
        {"head.down.weight", "head.up.weight"} if scope == "head-tail" else set())
    for name in sharing.before[1]:
        mean = sum(sharing.before[n][name] for n in sharing.before) / 3
        for node in sharing.before:
            if name in shared:  # SecAgg+ quantization: 16 / 2^22 per value at most
                assert (sharing.after[node][name] - mean).abs().max() < 4e-6
            else:  # personal: untouched
                assert torch.equal(sharing.after[node][name], sharing.before[node][name])
    assert not torch.equal(sharing.before[1]["tail.adapter.up.weight"], sharing.before[2]["tail.adapter.up.weight"])
    # the cloud's side receives public keys, encrypted key shares, masked vectors, key shares, acks:
    # no tenant's parameters (the only floats from a tenant would be a FitRes; it is emptied by the mod)
    for reply in grid.seen:
        assert not any(len(record) for record in reply.content.array_records.values())
        vectors = [v for rec in reply.content.config_records.values() for k, v in rec.items() if k == "masked_parameters"]
        for masked in vectors:
            from flwr.common import bytes_to_ndarray
            arrays = [bytes_to_ndarray(b) for b in masked]
            assert all(a.dtype.kind in "iu" for a in arrays)  # masked integers modulo 2^32, no float
            for node in sharing.before:
                q = np.rint((sharing.before[node]["tail.adapter.up.weight"].numpy() + 8.0) * 2**22 / 16)
                assert not any(a.shape == q.shape and np.abs(a - q).max() < 2 for a in arrays)


def test_plain_sharing_all_averages_the_classifier_too_and_keeps_the_last_rounds_copies(
        task_identity: None, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {**PLAIN, "share": "all", "num-server-rounds": 2}
    grid = LocalGrid(make_client_app(config), 3, node_config=UNPINNED)
    sharing, rounds = _plain_run(monkeypatch, config, grid)
    assert rounds[0].sharing.tenants == ["tenant-0", "tenant-1", "tenant-2"] and rounds[0].sharing.round_trips == 6
    before, after = sharing.rounds[1]
    for name in before[1]:  # every parameter, the classifier included, is the mean after round 1
        mean = sum(before[n][name] for n in before) / 3
        assert all((after[n][name] - mean).abs().max() < 4e-6 for n in after), name
    assert not torch.equal(before[1]["tail.classifier.weight"], before[2]["tail.classifier.weight"])
    # after the last round nothing is shared: each tenant keeps the copy it fine-tuned from the mean
    assert rounds[1].sharing.tenants == [] and rounds[1].sharing.round_trips == 0
    final_before, final_after = sharing.rounds[2]
    assert all(torch.equal(final_after[n][k], final_before[n][k]) for n in final_after for k in final_after[n])
    assert not torch.equal(final_after[1]["tail.classifier.weight"], final_after[2]["tail.classifier.weight"])


def test_results_json_records_each_rounds_sharing_phase(task_identity: None, tmp_path) -> None:
    config = {**PLAIN, "share": "tail", "results-dir": str(tmp_path)}
    run_recorded(LocalGrid(make_client_app(config), 3, node_config=UNPINNED), config)
    (row,) = json.loads((tmp_path / "results.json").read_text())["runs"][0]["rounds"][-1:]
    sharing = row["sharing"]
    assert sharing["tenants"] == ["tenant-0", "tenant-1", "tenant-2"] and sharing["dropped"] == {}
    assert sharing["round_trips"] == 6 and sharing["threshold"] == 2
    assert 0 < sharing["bytes_to_tenants"] < 3 * row["bytes_down"] and 0 < sharing["bytes_from_tenants"]


def test_sharing_off_changes_nothing(task_identity: None, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = Spying(make_client_app(PLAIN), 3)
    reports: list = []
    run_cloud(grid, PLAIN, reports.append)
    assert grid.seen == [] and all(r.sharing is None for r in reports if isinstance(r, RoundReport))


@pytest.mark.parametrize("stage", [2, 3])
def test_a_tenant_that_fails_in_sharing_does_not_sink_the_others(stage: int, task_identity: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = {**PLAIN, "share": "tail", "min-nodes": 4}
    seen: list[int] = []

    def intercept(node: int, message_type: str) -> str | None:
        if node == 4 and message_type == "train":
            seen.append(node)  # SecAgg+'s stages: setup, share keys, collect (silent here), unmask
            return "silent" if len(seen) == stage else None
        return None

    grid = LocalGrid(make_client_app(config), 4, intercept, node_config=UNPINNED)
    sharing, rounds = _plain_run(monkeypatch, config, grid)
    report = rounds[0].sharing
    assert report.tenants == ["tenant-0", "tenant-1", "tenant-2"] and "tenant-3" in report.dropped
    # a drop-out in share keys dooms the attempt (nobody holds its key shares): it stops before the
    # collect stage (the tenants share once per round) and runs once more without it; one at the
    # collect stage is what SecAgg+ recovers from (its masks rebuilt from the shares)
    assert report.round_trips == (2 + 5 + 1 if stage == 2 else 5 + 1)
    assert report.threshold == (2 if stage == 2 else 3)  # more than half of the phase's tenants
    mean = sum(sharing.before[n]["tail.adapter.up.weight"] for n in (1, 2, 3)) / 3
    assert all((sharing.after[n]["tail.adapter.up.weight"] - mean).abs().max() < 4e-6 for n in (1, 2, 3))
    assert torch.equal(sharing.after[4]["tail.adapter.up.weight"], sharing.before[4]["tail.adapter.up.weight"])


@pytest.mark.parametrize("scope", ["tail", "all"])
def test_secure_sharing_halves_reconstruct_the_average_adapter(scope: str, task_identity: None, tmp_path) -> None:
    rounds = 2 if scope == "all" else 1  # "all" shares after every round but the last
    config = {**SECURE, "share": scope, "num-server-rounds": rounds}
    grid = Spying(make_client_app(config), 3, dealer=tmp_path, node_config=THREE, sharing_keys=tmp_path / "share")
    _, body = split_encoder(load_encoder("tiny", seed=0))
    strategy = SecureSplitStrategy(SecureCloudParty(body, None), NodeDealer(120.0), local_steps=2,
                                   reply_timeout=120.0, global_eval=False)
    sharing = Recording(grid, "secure", scope, 0.5, 120.0)
    strategy.sharing = sharing
    reports: list = []
    strategy.start(grid, rounds, eval_every=0, on_report=reports.append)
    report = [r for r in reports if isinstance(r, RoundReport)][0].sharing
    assert report.tenants == ["tenant-0", "tenant-1", "tenant-2"] and report.round_trips == 6
    if scope == "all":
        last = [r for r in reports if isinstance(r, RoundReport)][-1].sharing
        assert last.tenants == [] and last.round_trips == 0  # each tenant keeps its fine-tuned copy
    shared = ("tail.",) if scope == "tail" else ("tail.", "head.", "cls.")
    nodes = sorted(sharing.before)
    for name in ("tail.A", "tail.B", "head.A", "cls.Wc", "cls.bc"):
        models = {n: decode(sharing.before[n][f"client/{name}"] + sharing.before[n][f"cloud/{name}"]) for n in nodes}
        after = {n: decode(sharing.after[n][f"client/{name}"] + sharing.after[n][f"cloud/{name}"]) for n in nodes}
        for node in nodes:
            if name.startswith(shared):  # client halves + cloud halves = the mean adapter (1 LSB)
                assert (after[node] - sum(models.values()) / 3).abs().max() <= 2 * 2.0 ** -16
            else:
                assert torch.equal(after[node], models[node])
    # the cloud's side saw masked integers and the tenants' acks: never a half
    halves = [sharing.before[n]["client/tail.B"] for n in nodes]
    for reply in grid.seen:
        assert not any(len(record) for record in reply.content.array_records.values())
        for rec in reply.content.config_records.values():
            for value in rec.values():
                blobs = value if isinstance(value, list) else [value]
                for h in halves:
                    low = torch.remainder(h, RING_MOD).numpy().astype(np.int64).tobytes()
                    assert not any(isinstance(b, bytes) and low[:64] in b for b in blobs)


def test_the_tenants_load_and_collect_rules_on_its_ledger() -> None:
    """No load after a begin reported the tenant's counts (a cloud that read them dropped its load);
    a secure collect needs every trained shared half changed since the last load, no step in flight."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    check_changed_since_load(context, {"tail.A": "a"}, False)  # the first phase: no load yet
    with pytest.raises(ProtocolError, match="in flight"):
        check_changed_since_load(context, {"tail.A": "a"}, True)
    note_loaded_halves(context, {"tail.A": "a", "tail.B": "b"})
    with pytest.raises(ProtocolError, match="tail.B unchanged since the last load"):
        check_changed_since_load(context, {"tail.A": "c", "tail.B": "b"}, False)
    check_changed_since_load(context, {"tail.A": "c", "tail.B": "d"}, False)
    context.state[POLICY_STATE] = ConfigRecord({"shared": 2, "loaded": 1, "unmasked": 2, "alive": 3})
    note_begin(context)
    with pytest.raises(ProtocolError, match="no phase waiting"):
        note_load(context, 3)
