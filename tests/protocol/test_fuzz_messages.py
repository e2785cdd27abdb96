"""Fuzzing every protocol message, set-up included, of both protocols (issue 13, fast variant).

Hypothesis mutates the message of one event of a tiny plain or secure world (shapes, dtypes,
meta / sparse / non-contiguous tensors, truncation, NaN / Inf, step numbers, tenant ids,
types, dict keys), replaces it by another message of the control trace (stage order,
replays, another tenant's message) or delivers it twice. The oracle (``tests/fuzz_worlds.py``)
requires each to be rejected cleanly (ProtocolError, state digest unchanged, and the genuine
message then completes the run like the control run) or accepted harmlessly; never a
corrupted state or another exception type. The long variant is
``simulations/fuzz_messages.py``; the regression tests below keep what it found.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_plain import PLAIN_VARIANTS, PlainWorld
from fuzz_secure import SECURE_VARIANTS, SecureWorld
from fuzz_strategies import mutations
from fuzz_worlds import ACCEPTED, REJECTED, Duplicate, Given, Swap, check_case, control_run, event_index, fuzzable

from flower_split.config import RunConfig
from flower_split.model import build_split
from flower_split.protocol import ClientParty, CloudParty
from flower_split.transport import InProcessTransport

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INPUTS = st.one_of(mutations(), mutations(), mutations(), st.builds(Swap, st.integers(0, 10_000)),
                   st.just(Duplicate()))


@pytest.fixture(scope="module", params=PLAIN_VARIANTS[:2], ids=str)
def plain(request):
    world = PlainWorld(request.param)
    return world, control_run(world)


@pytest.fixture(scope="module", params=SECURE_VARIANTS[:2], ids=str)
def secure(request):
    world = SecureWorld(request.param)
    return world, control_run(world)


def _fuzz(world, control, data) -> None:
    k = data.draw(st.sampled_from(fuzzable(world)), label="event")
    item = data.draw(INPUTS, label="input")
    for outcome in check_case(world, control, k, [item]):
        assert outcome.verdict in (REJECTED, ACCEPTED), outcome


@FAST
@given(data=st.data())
def test_plain_messages_are_rejected_cleanly_or_harmless(plain, data) -> None:
    _fuzz(*plain, data)


@settings(FAST, max_examples=15)
@given(data=st.data())
def test_secure_messages_are_rejected_cleanly_or_harmless(secure, data) -> None:
    _fuzz(*secure, data)


# ---------------------------------------------------------------------------------------------
# regressions: what the fuzzer found (each crashed or corrupted state before its fix)


def _rejected(world, control, event: str, make, tenant: str = "t0", nth: int = 0) -> None:
    outcomes = check_case(world, control, event_index(world, event, tenant, nth), [Given(make)])
    assert [o.verdict for o in outcomes] == [REJECTED], outcomes


def _replace(**changes):
    return lambda m: dataclasses.replace(m, **changes)


PLAIN_CLOUD_CASES = {
    "sparse f": lambda m: dataclasses.replace(m, f=m.f.to_sparse()),
    "meta f": lambda m: dataclasses.replace(m, f=m.f.to("meta")),
    "sparse mask": lambda m: dataclasses.replace(m, attention_mask=m.attention_mask.to_sparse()),
    "meta mask": lambda m: dataclasses.replace(m, attention_mask=m.attention_mask.to("meta")),
    "mask value 2": lambda m: dataclasses.replace(m, attention_mask=m.attention_mask * 2),
    "empty sequence": lambda m: dataclasses.replace(m, attention_mask=torch.zeros_like(m.attention_mask)),
    "tenant not a str": _replace(tenant=["t0"]),
    "step not an int": _replace(step=[0]),
    "negative step": _replace(step=-1),
    "train not a bool": _replace(train=1),
    "not a message": lambda m: None,
}


@pytest.mark.parametrize("case", list(PLAIN_CLOUD_CASES))
def test_plain_cloud_regressions(plain, case: str) -> None:
    _rejected(*plain, "cloud.handle(HeadOutput)", PLAIN_CLOUD_CASES[case])
    _rejected(*plain, "cloud.handle_many", PLAIN_CLOUD_CASES[case])


PLAIN_CLIENT_CASES = {
    "sparse h": lambda m: dataclasses.replace(m, h=m.h.to_sparse()),
    "meta h": lambda m: dataclasses.replace(m, h=m.h.to("meta")),
    "not a message": lambda m: "BodyOutput",
    "tenant not a str": _replace(tenant=None),
}


@pytest.mark.parametrize("case", list(PLAIN_CLIENT_CASES))
def test_plain_client_regressions(plain, case: str) -> None:
    _rejected(*plain, "client.handle(BodyOutput)", PLAIN_CLIENT_CASES[case])


def test_plain_client_takes_a_received_h_that_carries_a_graph(plain) -> None:
    """It used to set requires_grad on the received tensor itself (a non-leaf: no .grad, AttributeError)."""
    world, control = plain

    def with_graph(m):
        return dataclasses.replace(m, h=m.h.clone().requires_grad_(True) * 1.0)

    k = event_index(world, "client.handle(BodyOutput)")
    assert [o.verdict for o in check_case(world, control, k, [Given(with_graph)])] == [ACCEPTED]


def test_plain_client_does_not_keep_the_tensors_of_a_loaded_state(secure_data) -> None:
    """Its optimizers used to alias the momentum buffers of the state given to load_state_dict."""
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu").validate()
    parts = build_split("tiny", 77, 4, 8)
    client = ClientParty("t0", parts.embedder, parts.head, parts.tail, config, total_steps=10)
    transport = InProcessTransport(CloudParty(parts.body))
    for i in range(2):
        message = client.begin(secure_data.collate([i, i + 1]))
        while message is not None:
            message = client.handle(transport.send(message))
        if i == 0:
            saved = client.state_dict()
            kept = {k: v["momentum_buffer"].clone() for k, v in saved["tail_optimizer"]["state"].items()}
            client.load_state_dict(saved)
    assert all(torch.equal(saved["tail_optimizer"]["state"][k]["momentum_buffer"], v) for k, v in kept.items())


SECURE_CASES = {
    "cloud.handle": {
        "sparse ring item": lambda m: _item(m, lambda t: t.to_sparse()),
        "meta ring item": lambda m: _item(m, lambda t: t.to("meta")),
        "train 1 for True": _replace(train=1),
        "batch as a float": lambda m: dataclasses.replace(m, batch=float(m.batch)),
    },
    "cloud.accept_material": {
        "one sealed bit flipped": lambda m: dataclasses.replace(m, sealed=bytes([m.sealed[0] ^ 1]) + m.sealed[1:]),
        "sealed bytes as a tensor": lambda m: dataclasses.replace(m, sealed=torch.zeros(3, dtype=torch.int64)),
        "step as a float": lambda m: dataclasses.replace(m, step=float(m.step)),
    },
    "cloud.register": {
        "label protection as a list": _replace(label_protection=["client"]),
        "tail input as a list": _replace(tail_input=["tokens"]),
    },
    "dealer.register": {
        "tenant not a str": _replace(tenant=["t0"]),
        "dims not a sequence": _replace(dims=None),
        "train_head not a bool": _replace(train_head="yes"),
    },
    "dealer.handle": {
        "tenant not a str": _replace(tenant=["t0"]),
        "train not a bool": _replace(train=1),
    },
}


def _item(message, change):
    name = next(k for k, v in sorted(message.items.items()) if isinstance(v, torch.Tensor))
    return dataclasses.replace(message, items={**message.items, name: change(message.items[name])})


@pytest.mark.parametrize("event,case", [(e, c) for e, cases in SECURE_CASES.items() for c in cases])
def test_secure_regressions(secure, event: str, case: str) -> None:
    _rejected(*secure, event, SECURE_CASES[event][case])
