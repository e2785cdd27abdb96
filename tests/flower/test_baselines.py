"""The FedAvg-LoRA family of baselines (issue 18), in process on the tiny model: FedProx's proximal
term, the plateau stop, personalisation and local-only training, through Flower's strategies."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flower_split.config import ConfigError
from flower_split.flower import fedavg_strategy
from flower_split.flower.fedavg_client_app import LOCAL_MODEL, make_fedavg_client_app
from flower_split.flower.fedavg_reports import FedAvgEvalReport, FedAvgRoundReport, PersonalizedEvalReport, PlateauStop
from flower_split.flower.fedavg_server_app import run_fedavg_cloud
from flower_split.flower.fedavg_settings import fedavg_settings_from_run_config
from flower_split.flower.fedavg_training import model_for, proximal_term, trainable_state
from flower_helpers import LocalGrid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"model": "tiny", "device": "cpu", "partition": "iid", "lr": 0.01, "batch-size": 16,
        "max-train-samples": 64, "max-test-samples": 32, "num-server-rounds": 2, "eval-every": 1,
        "global-eval": False, "min-nodes": 2, "reply-timeout": 120.0}


def _context(partition_id: int = 0) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition_id, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def _train(app, initial: dict, context: Context, **config: object) -> Message:
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=initial),
                          "config": ConfigRecord({"local-epochs": 1, "server-round": 1, **config})})
    return app(Message(content, 1, "train"), context)


def _distance(state: dict, initial: dict) -> float:
    return sum(float((state[k] - initial[k]).pow(2).sum()) for k in initial)


def test_proximal_term_is_zero_at_the_anchor_and_at_mu_zero() -> None:
    anchor = [torch.randn(3, 2), torch.randn(4)]
    moved = [a + 0.5 for a in anchor]
    assert float(proximal_term(anchor, anchor, 1.0)) == 0.0
    assert float(proximal_term(moved, anchor, 0.0)) == 0.0
    assert float(proximal_term(moved, anchor, 2.0)) == pytest.approx(0.5 * 2.0 * 0.25 * 10)


def test_fedprox_term_changes_the_update_and_mu_zero_is_fedavg(task_identity: None) -> None:
    app = make_fedavg_client_app(TINY)
    config, _, _ = fedavg_settings_from_run_config(TINY)
    model = model_for(config, 77)
    initial = {k: v.clone() for k, v in trainable_state(model).items()}
    fedavg = _train(app, initial, _context()).content["arrays"].to_torch_state_dict()
    mu_zero = _train(app, initial, _context(), **{"proximal-mu": 0.0}).content["arrays"].to_torch_state_dict()
    prox = _train(app, initial, _context(), **{"proximal-mu": 50.0}).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(fedavg[k], mu_zero[k]) for k in initial)  # mu = 0: exactly FedAvg
    assert not all(torch.equal(fedavg[k], prox[k]) for k in initial)
    assert _distance(prox, initial) < _distance(fedavg, initial)  # pulled towards the global model
    bad = _train(app, initial, _context(), **{"proximal-mu": -1.0})
    assert bad.has_error() and "config.proximal-mu" in bad.error.reason


def test_prior_offset_is_each_tenants_own_and_never_travels(task_identity: None) -> None:
    values = {**TINY, "prior-offset": True}
    app = make_fedavg_client_app(values)
    config, _, _ = fedavg_settings_from_run_config(values)
    model = model_for(config, 77)
    initial = {k: v.clone() for k, v in trainable_state(model).items()}
    plain = _train(make_fedavg_client_app(TINY), initial, _context()).content["arrays"].to_torch_state_dict()
    priors = []
    for partition in (0, 1):
        reply = _train(app, initial, _context(partition)).content["arrays"].to_torch_state_dict()
        assert reply.keys() == initial.keys()  # the offset is a buffer: it never leaves the tenant
        priors.append(model_for(config, 77).prior.clone())
        if partition == 0:
            assert not all(torch.equal(reply[k], plain[k]) for k in initial)  # it entered the training loss
    assert not torch.equal(priors[0], priors[1])  # each tenant trains with its own labels' prior
    assert model_for(fedavg_settings_from_run_config(TINY)[0], 77).prior is None  # off: no offset


def test_plateau_rule() -> None:
    rule = PlateauStop(patience=2, min_delta=0.002)
    assert [rule.update(a) for a in (0.50, 0.60, 0.601, None, 0.6015)] == [False, False, False, False, True]
    assert rule.best == 0.60
    assert not any(PlateauStop(0, 0.002).update(0.5) for _ in range(5))  # patience 0: never


def test_plateau_stop_ends_the_rounds_early(task_identity: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # a flat accuracy curve: every tenant reports 0.5 whatever it learns
    monkeypatch.setattr("flower_split.flower.fedavg_client_app.evaluate", lambda *a: {"accuracy": 0.5, "macro-f1": 0.1})
    values = {**TINY, "num-server-rounds": 6, "plateau-patience": 2}
    reports: list = []
    grid = LocalGrid(make_fedavg_client_app(values), 2)
    history, _ = run_fedavg_cloud(grid, values, reports.append)
    rounds = [r.server_round for r in reports if isinstance(r, FedAvgRoundReport)]
    assert rounds == [1, 2, 3] and history.stopped_after == 3  # best at 1, no gain at 2 and 3
    assert [r.server_round for r in history.evaluations] == [1, 2, 3]


def _watched(client: Callable[[Message, Context], Message]) -> tuple[Callable[[Message, Context], Message],
                                                                     list[Message], list[Message]]:
    """``client``, recording every message it gets and every reply it gives."""
    sent: list[Message] = []
    replies: list[Message] = []

    def watched(message: Message, context: Context) -> Message:
        sent.append(message)
        replies.append(client(message, context))
        return replies[-1]

    return watched, sent, replies


def test_personalisation_fine_tunes_locally_only(task_identity: None) -> None:
    values = {**TINY, "num-server-rounds": 1, "personalize-epochs": 2}
    watched, sent, replies = _watched(make_fedavg_client_app(values))

    history, result = run_fedavg_cloud(LocalGrid(watched, 2), values)
    personal = [(m, r) for m, r in zip(sent, replies) if m.metadata.message_type == "train.personalize"]
    assert len(personal) == 2
    for message, reply in personal:
        assert not reply.has_error() and "arrays" not in reply.content  # the fine-tuned model stays home
        assert message.content["config"]["personalize-epochs"] == 2
        sent_arrays = message.content["arrays"].to_torch_state_dict()
        final = result.arrays.to_torch_state_dict()
        assert all(torch.equal(sent_arrays[k], final[k]) for k in final)  # it starts from the global model
        assert reply.content["metrics"]["steps"] == 2 * 2  # 2 epochs of 32 rows / 16
    report = history.personalized
    assert isinstance(report, PersonalizedEvalReport) and sorted(report.per_tenant) == ["tenant-0", "tenant-1"]
    assert report.epochs == 2 and report.server_round == 2
    assert report.per_tenant != history.evaluations[-1].per_tenant or report.per_tenant_f1 != \
        history.evaluations[-1].per_tenant_f1  # evaluated with the fine-tuned models, not the global one


def test_local_only_never_aggregates(task_identity: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_averaging(*args: object, **kwargs: object) -> None:
        raise AssertionError("local-only must not average")

    monkeypatch.setattr("flwr.serverapp.strategy.fedavg.aggregate_arrayrecords", no_averaging)
    values = {**TINY, "baseline": "local-only"}
    watched, sent, replies = _watched(make_fedavg_client_app(values))

    grid = LocalGrid(watched, 2)
    history, result = run_fedavg_cloud(grid, values)
    assert not len(result.arrays)  # Flower never received an aggregated model
    trains = [m for m in sent if m.metadata.message_type == "train"]
    assert [len(m.content["arrays"]) > 0 for m in trains] == [True, True, False, False]  # the start only
    assert all("arrays" not in r.content for r in replies)  # no tenant's weights leave it
    own = [grid.contexts[node].state[LOCAL_MODEL].to_torch_state_dict() for node in (1, 2)]
    assert not all(torch.equal(own[0][k], own[1][k]) for k in own[0])  # two different models
    assert [r.server_round for r in history.rounds] == [1, 2]
    assert all(isinstance(e, FedAvgEvalReport) and len(e.per_tenant) == 2 for e in history.evaluations)
    assert fedavg_strategy.LocalOnlyLora.run_name == "local-lora"


def test_local_only_evaluation_needs_a_trained_model(task_identity: None) -> None:
    app = make_fedavg_client_app(TINY)
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"local-only": True, "server-round": 1})})
    reply = app(Message(content, 1, "evaluate"), _context())
    assert reply.has_error() and "nothing to evaluate" in reply.error.reason


@pytest.mark.parametrize("values, message", [
    ({"baseline": "fedsgd"}, "baseline: expected one of"),
    ({"proximal-mu": 0.1}, "proximal-mu: only the fedprox baseline"),
    ({"baseline": "fedprox", "proximal-mu": -0.1}, "proximal-mu: expected a finite number"),
    ({"plateau-patience": -1}, "plateau-patience: expected an integer >= 0"),
    ({"plateau-delta": "x"}, "plateau-delta: expected a finite number"),
    ({"baseline": "local-only", "personalize-epochs": 1}, "personalize-epochs: local-only"),
])
def test_baseline_settings_are_validated(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fedavg_settings_from_run_config({"model": "tiny", **values})
