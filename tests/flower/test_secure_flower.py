"""Secure mode over Flower: message transport, the secure strategy with in-process ClientApps
(both label protections, a tenant dropped mid-step), and a real Ray simulation."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from flower_helpers import LocalGrid, checked_for_cycles, cyclic_data
from flower_split.apps.client_app import make_client_app
from flower_split.model import load_encoder, split_encoder
from flower_split.mpc import decode
from flower_split.protocol import ProtocolError
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_messages import ClientSetup, DealerHello, SecureMessage
from flower_split.backends import backend_for
from flower_split.config import ConfigError
from flower_split.apps.server_app import make_server_app
from flower_split.flower.context_state import records_to_state, state_to_records
from flower_split.flower.settings import settings_from_run_config
from flower_split.flower.secure_records import (
    pack_hello, pack_secure, pack_setup, unpack_hello, unpack_secure, unpack_setup,
)
from flower_split.flower.dealer_link import NodeDealer
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.runs.simulate import simulated_node_keys
from flower_split.flower.strategy_utils import EvalReport, RoundReport

SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 192, "max-test-samples": 64,
          "local-steps": 4, "num-server-rounds": 2, "eval-initial": True, "min-nodes": 2, "reply-timeout": 120.0,
          "security": "secure", "global-eval": False}


def _message() -> SecureMessage:
    items = {"head.fwd/s0/u/eps": torch.arange(6, dtype=torch.int64).reshape(2, 3), "input.seed_e": b"\x01" * 32}
    return SecureMessage("tenant-0", 3, 1, "client", "head.fwd[0]", True, 2, 5, 16, items)


# ---------------------------------------------------------------------------------------------
# transport


def test_secure_messages_round_trip_through_record_dicts() -> None:
    message = _message()
    back = unpack_secure(pack_secure(message), "tenant-0", "client")
    assert {k: v for k, v in vars(back).items() if k != "items"} == \
        {k: v for k, v in vars(message).items() if k != "items"}
    assert torch.equal(back.items["head.fwd/s0/u/eps"], message.items["head.fwd/s0/u/eps"])
    assert back.items["input.seed_e"] == message.items["input.seed_e"]
    hello = DealerHello(b"\x02" * 32, "tenant-0", b"s" * 64)
    assert unpack_hello(pack_hello(hello)) == hello
    setup = ClientSetup("tenant-0", b"a" * 32, b"b" * 32, b"", b"c" * 32, (32, 4, 8, 77), "client", True, 16, 8,
                        {"lr_head": 0.05, "total_steps": 10}, tail_input="pooled")
    assert unpack_setup(pack_setup(setup)) == setup


def _corruptions() -> dict[str, RecordDict]:
    cases = {}
    content = pack_secure(_message())
    del content["payload"]
    cases["missing ArrayRecord 'payload'"] = content
    content = pack_secure(_message())
    content["payload"]["extra"] = content["payload"]["head.fwd/s0/u/eps"]
    cases["items do not match the header"] = content
    content = pack_secure(_message())
    content["secure"]["step"] = "3"
    cases["secure.step: expected int"] = content
    content = pack_secure(_message())
    content["blobs"]["input.seed_e"] = "not bytes"
    cases["blobs.input.seed_e: expected bytes"] = content
    return cases


@pytest.mark.parametrize("reason", list(_corruptions()))
def test_malformed_secure_records_are_rejected_by_name(reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace(".", r"\.")):
        unpack_secure(_corruptions()[reason], "tenant-0", "client")


def test_secure_message_for_another_tenant_or_from_the_wrong_side_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="delivered to 'tenant-1'"):
        unpack_secure(pack_secure(_message()), "tenant-1", "client")
    with pytest.raises(ProtocolError, match="sender"):
        unpack_secure(pack_secure(_message()), "tenant-0", "cloud")


def test_state_with_bytes_round_trips() -> None:
    state = {"key": b"\x00\xffsecret", "nested": {"seeds": [b"a" * 32, None], 3: torch.ones(2)}}
    back = records_to_state(*state_to_records(state))
    assert back["key"] == state["key"] and back["nested"]["seeds"] == state["nested"]["seeds"]
    assert torch.equal(back["nested"][3], torch.ones(2))


def test_state_records_leave_no_cycles_holding_the_state() -> None:
    state = {"halves": {"w": torch.ones(64, 8)}, "optim": {0: [torch.zeros(3), b"k"]}, "step": 2}
    assert cyclic_data(lambda: records_to_state(*state_to_records(state))) == []


def test_flower_run_config_is_checked_by_the_secure_backend() -> None:
    config, settings = settings_from_run_config({**SECURE, "label-protection": "client", "secure-metrics": False})
    assert backend_for(config, settings).name == "secure" and not settings.secure_metrics
    config, settings = settings_from_run_config({**SECURE, "optimizer": "adamw"})
    with pytest.raises(ConfigError, match="^optimizer: secure mode"):  # before any model is loaded
        backend_for(config, settings)


# ---------------------------------------------------------------------------------------------
# strategy with in-process ClientApps


def _strategy(**overrides) -> SecureSplitStrategy:
    """The strategy as the ServerApp builds it: no dealer inside, the dealer node found at set-up."""
    _, body = split_encoder(load_encoder("tiny", seed=0))
    return SecureSplitStrategy(SecureCloudParty(body, None), NodeDealer(120.0), local_steps=SECURE["local-steps"],
                               reply_timeout=120.0, global_eval=False, **overrides)


def _model_weights(grid: LocalGrid, strategy: SecureSplitStrategy, node: int) -> dict[str, torch.Tensor]:
    """A tenant's adapter weights: its halves (from its Context.state) plus the cloud's."""
    state = grid.contexts[node].state
    client = records_to_state(state["secure.arrays"], state["secure.config"])
    tenant = strategy.tenant_of[node]
    cloud = strategy.cloud.export_halves(tenant)
    return {k: decode(client["halves"]["weights"][k] + cloud[k]) for k in cloud}


@pytest.mark.parametrize("mode,pace", [("he", "auto"), ("client", "auto"), ("client", "stream")])
def test_secure_strategy_trains_every_tenant(mode: str, pace: str, task_identity: None, tmp_path) -> None:
    config = {**SECURE, "label-protection": mode}
    grid = LocalGrid(make_client_app(config), 2, dealer=tmp_path)
    strategy = _strategy(step_pace=pace)  # auto: lockstep on the in-process grid
    reports: list = []
    strategy.start(grid, 2, eval_every=1, eval_initial=True, on_report=reports.append)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    evaluations = [r for r in reports if isinstance(r, EvalReport)]
    assert [r.server_round for r in rounds] == [1, 2] and [e.server_round for e in evaluations] == [0, 1, 2]
    assert all(r.tenants == ["tenant-0", "tenant-1"] and not r.dropped and r.steps == 4 for r in rounds)
    # no training loss reaches the cloud (docs/secure.md §9); the batch sizes do
    assert all(r.train_loss is None and r.num_examples == 2 * 4 * 16 for r in rounds)
    # every client message of a step is one round trip for all tenants: 11 (he) or 10 (client);
    # the dealer node's material costs one more at the round's first step only (later steps'
    # material rides along with the step before, asked ahead from the shape each tenant announces)
    per_step = 10  # both modes since the held inputs (9 client messages + the last cloud one)
    assert all(r.round_trips == 4 * per_step + 1 for r in rounds)
    # the dealer's time (its node's round trip) is reported apart from the cloud's, inside the round's
    assert all(0 < r.dealer_seconds and r.dealer_seconds + r.cloud_seconds < r.wall_seconds for r in rounds)
    assert evaluations[-1].num_examples == evaluations[0].num_examples and sum(evaluations[0].num_examples.values()) > 40
    for node in (1, 2):  # both tenants' halves add up to a sane model that moved
        weights = _model_weights(grid, strategy, node)
        assert max(w.abs().max().item() for w in weights.values()) < 10.0
        assert weights["cls.bc"].abs().max() > 0


def test_tenant_dropped_mid_step_rejoins_with_a_consistent_model(task_identity: None, tmp_path) -> None:
    calls = {"n": 0}

    def intercept(node: int, message_type: str) -> str | None:
        if node == 2 and message_type == "train.secure_next":
            calls["n"] += 1
            if calls["n"] == 7:  # late in the second step: after the tail updates of one side
                return "silent"
        return None

    config = {**SECURE, "label-protection": "client"}
    grid = LocalGrid(make_client_app(config), 2, intercept, dealer=tmp_path)
    strategy = _strategy()
    reports: list = []
    strategy.start(grid, 2, eval_every=0, on_report=reports.append)
    first, second = (r for r in reports if isinstance(r, RoundReport))
    assert "no reply" in first.dropped["tenant-1"] and first.tenants == ["tenant-0"]
    assert second.tenants == ["tenant-0", "tenant-1"] and not second.dropped
    # the client answered message 7 (and may have updated); the cloud aborted; at the next
    # step they reconciled: one update count, and the halves still add up to a sane model
    client_state = records_to_state(grid.contexts[2].state["secure.arrays"], grid.contexts[2].state["secure.config"])
    assert {**client_state["halves"]["updates"], "loads": client_state["halves"]["loads"]} == strategy.cloud.counts("tenant-1")
    weights = _model_weights(grid, strategy, 2)
    assert max(w.abs().max().item() for w in weights.values()) < 10.0


def test_secure_client_messages_leave_no_cycles_holding_data(task_identity: None, tmp_path) -> None:
    found: list[str] = []
    grid = LocalGrid(checked_for_cycles(make_client_app({**SECURE, "label-protection": "he"}), found), 1,
                     dealer=tmp_path)
    _strategy(min_nodes=1).start(grid, 1, eval_every=1)
    assert found == []


def test_client_refuses_steps_before_set_up(task_identity: None) -> None:
    client_app = make_client_app({**SECURE, "label-protection": "client"})
    grid = LocalGrid(client_app, 1)
    instruction = RecordDict({"config": ConfigRecord({"head-updates": 0, "tail-updates": 0})})
    reply = client_app(Message(instruction, 1, "train.secure_begin"), grid.contexts[1])
    assert reply.has_error() and "not set up for secure mode" in reply.error.reason
    assert "secure.arrays" not in grid.contexts[1].state


# ---------------------------------------------------------------------------------------------
# real Flower simulation (Ray)


def test_secure_flower_simulation_learns() -> None:
    from flwr.simulation import run_simulation

    # one known start, so that the learning check below does not depend on a random one
    config = {**SECURE, "label-protection": "he", "local-steps": 6, "batch-size": 32,
              "insecure-reproducible-init": True, "allow-insecure-reproducible-init": True}
    config["simulated-dealer"] = True  # the third node is the dealer, with its own key file
    reports: list = []
    with simulated_node_keys(True):
        run_simulation(server_app=make_server_app(config, reports.append), client_app=make_client_app(config),
                       num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    evaluations = [r for r in reports if isinstance(r, EvalReport)]
    assert [r.server_round for r in rounds] == [1, 2] and all(not r.dropped for r in rounds)
    assert all(r.train_loss is None for r in rounds)  # secure tenants report no loss
    # 57 test rows near chance: accuracy moves in steps of 1.75 %, macro-F1 shows the learning
    assert evaluations[-1].macro_f1 > evaluations[0].macro_f1 and evaluations[-1].accuracy >= evaluations[0].accuracy
