"""Fuzzing the tenant's Flower handlers (issue 13): mutated server messages, plain and secure.

A control run of the strategy (plain: one training round and an evaluation; secure: the
set-up, one step and an evaluation) through in-process ClientApps records every message a
node receives, with its ``Context.state`` before and after. Hypothesis then takes one of node
1's deliveries, restores the state it had, and delivers instead a mutated content (records
dropped or added, config values of other types, arrays truncated or with other headers and
bytes, ...), another recorded content (stage order, a replay, node 2's message: another
tenant's), the right content under another message type, or the genuine message twice. Each
must get a ``ProtocolError`` error reply with ``Context.state`` unchanged, or be accepted; a
Python exception or any other error reply is a crash. Then the genuine message, delivered to
the restored state, must give the control run's reply and state (plain: identical; secure:
the same records, keys, shapes and dtypes, as its shares are fresh randomness).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flower_helpers import LocalGrid
from fuzz_strategies import digest, mutate, mutations

from flower_split.apps.client_app import make_client_app
from flower_split.flower.plain_strategy import SplitStrategy
from flower_split.flower.secure_strategy import SecureSplitStrategy
from flower_split.model import load_encoder, split_encoder
from flower_split.protocol import CloudParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.flower.dealer_link import NodeDealer

COMMON = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.3, "batch-size": 8, "max-length": 24, "max-train-samples": 64, "max-test-samples": 8,
          "local-steps": 2, "micro-batches": 2, "num-server-rounds": 1, "min-nodes": 2, "reply-timeout": 60.0,
          "global-eval": False, "insecure-reproducible-init": True, "allow-insecure-reproducible-init": True}
CONFIGS = {"plain": {**COMMON, "security": "plain"},
           "secure": {**COMMON, "security": "secure", "label-protection": "client", "local-steps": 1}}
"""``he`` adds CKKS key generation to every set-up (seconds); its messages are fuzzed at the protocol level."""
FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclasses.dataclass(frozen=True)
class Delivery:
    node: int
    message_type: str
    content: RecordDict
    before: RecordDict
    reply: Message
    after: RecordDict


def _copy(state: RecordDict) -> RecordDict:
    return RecordDict(dict(state.items()))  # handlers replace records, never change them in place


class RecordingGrid(LocalGrid):
    def __init__(self, client_app: Any, num_nodes: int, dealer: Any = None) -> None:
        super().__init__(client_app, num_nodes, dealer=dealer)
        self.deliveries: list[Delivery] = []

    def deliver(self, message: Message) -> Message | None:  # both lockstep and streamed messages
        node = message.metadata.dst_node_id
        before = _copy(self.contexts[node].state)
        reply = self.client_app(message, self.contexts[node])
        self.deliveries.append(Delivery(node, message.metadata.message_type, message.content, before, reply,
                                        _copy(self.contexts[node].state)))
        return reply


@pytest.fixture(scope="module", params=list(CONFIGS))
def recorded(request, tmp_path_factory):
    patch = pytest.MonkeyPatch()  # outside a Flower runtime, Message(...) needs a run id
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        patch.setattr(TaskIdentity, name, value)
    config = CONFIGS[request.param]
    app = make_client_app(config)
    secure = config["security"] == "secure"  # then the dealer is node 3, as in a deployment
    grid = RecordingGrid(app, 2, dealer=tmp_path_factory.mktemp("dealer") if secure else None)
    _, body = split_encoder(load_encoder("tiny", seed=0))
    if not secure:
        strategy = SplitStrategy(CloudParty(body), local_steps=2, micro_batches=2, global_eval=False)
    else:
        strategy = SecureSplitStrategy(SecureCloudParty(body, None, allow_reproducible_init=True), NodeDealer(60.0),
                                       local_steps=1, global_eval=False)
    reports: list = []
    strategy.start(grid, 1, eval_every=1, on_report=reports.append)
    assert all(not getattr(r, "dropped", {}) for r in reports), reports
    assert all(not d.reply.has_error() for d in grid.deliveries)
    yield request.param, app, grid, grid.contexts[1].node_config
    patch.undo()


def _deliver(app: Any, node_config: Any, node: int, message_type: str, content: Any, state: RecordDict):
    context = Context(run_id=1, node_id=node, node_config=node_config, state=_copy(state), run_config={})
    return app(Message(content, node, message_type), context), context.state


def _signature(value: Any, exact: bool) -> Any:
    """The value itself (``exact``), or its structure: record and key names, array dtypes and shapes."""
    if exact:
        return digest(value)
    if isinstance(value, RecordDict) or hasattr(value, "items") and not isinstance(value, (bytes, str)):
        return {k: _signature(v, exact) for k, v in value.items()}
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return (str(value.dtype), tuple(value.shape))
    if isinstance(value, bytes):  # seeds keep their length, CKKS contexts and envelopes do not
        return "bytes"
    return type(value).__name__


def _fuzz_one(recorded, data) -> None:
    name, app, grid, node_config = recorded
    mine = [d for d in grid.deliveries if d.node == 1]
    target = data.draw(st.sampled_from(mine), label="delivery")
    choice = data.draw(st.sampled_from(["mutate", "mutate", "mutate", "swap", "wrong type", "duplicate"]))
    if choice == "mutate":
        made = mutate(target.content, data.draw(mutations(), label="mutation"))
        if made is None or not isinstance(made[0], RecordDict):  # what no Flower message can carry
            return
        attempts = [(target.message_type, made[0], made[1])]
    elif choice == "swap":
        other = data.draw(st.sampled_from(grid.deliveries), label="other")
        attempts = [(other.message_type, other.content, f"swap<-{other.message_type}@node{other.node}"),
                    (target.message_type, other.content, f"content of {other.message_type}")]
    elif choice == "wrong type":
        other = data.draw(st.sampled_from(sorted({d.message_type for d in grid.deliveries})), label="type")
        attempts = [(other, target.content, f"as {other}")]
    else:
        attempts = [(target.message_type, target.content, "duplicate")]
    start = target.after if choice == "duplicate" else target.before
    for message_type, content, label in attempts:
        if content is target.content and message_type == target.message_type and choice != "duplicate":
            continue
        reply, state = _deliver(app, node_config, 1, message_type, content, start)
        if reply.has_error():
            assert reply.error.reason.startswith("ProtocolError"), (label, reply.error.reason)
            assert digest(state) == digest(start), f"{label}: rejected but Context.state changed"
        else:
            assert isinstance(reply.content, RecordDict), label
    # the genuine message on the state it had: the control run's reply and state
    reply, state = _deliver(app, node_config, 1, target.message_type, target.content, target.before)
    exact = name == "plain"
    assert not reply.has_error(), reply.error
    assert _signature(reply.content, exact) == _signature(target.reply.content, exact)
    assert _signature(state, exact) == _signature(target.after, exact)


@FUZZ
@given(data=st.data())
def test_handlers_reject_bad_messages_cleanly(recorded, data) -> None:
    _fuzz_one(recorded, data)


def test_a_huge_batch_count_is_refused_before_any_work(recorded) -> None:
    """Found by the fuzzer: ``num-batches`` 2^62 had the plain tenant embed batches without end."""
    name, app, grid, node_config = recorded
    if name != "plain":
        pytest.skip("plain instruction")
    target = next(d for d in grid.deliveries if d.node == 1 and d.message_type in ("train.head_fwd",))
    for count in (2**62, 3, -1):
        content = RecordDict({"config": ConfigRecord({**target.content["config"], "num-batches": count})})
        reply, state = _deliver(app, node_config, 1, target.message_type, content, target.before)
        assert reply.has_error() and "num-batches" in reply.error.reason
        assert digest(state) == digest(target.before)
