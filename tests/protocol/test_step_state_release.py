"""A secure step drops the values no later operation reads, on both parties, and still trains.

The state a tenant saves between messages is shipped with every message in a Flower simulation
(docs/BENCHMARKS.md, "What a tenant's state weighs"): once ``f`` is opened the head's output
share ``y`` (and ``hB``) is dead; once ``dL/dh`` is opened the tail and classifier scopes are.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.flower.context_state import state_tensor_bytes
from flower_split.model import build_split
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_client import SecureClientParty
from flower_split.protocol.secure_cloud import SecureCloudParty
from flower_split.protocol.secure_dealer import SecureDealerParty
from flower_split.transport.secure_inprocess import SecureLocalTransport

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parties(config: RunConfig, keep_graphs: bool = False) -> tuple[SecureClientParty, SecureCloudParty,
                                                                     SecureLocalTransport]:
    parts = build_split("tiny", 77, 4, 8, tail_input=config.tail_input)
    dealer = SecureDealerParty()
    cloud = SecureCloudParty(parts.body, dealer.public, keep_graphs=keep_graphs)
    client = SecureClientParty("t0", parts.embedder, copy.deepcopy(parts.head), copy.deepcopy(parts.tail), config, 4)
    transport = SecureLocalTransport(cloud, dealer)
    transport.connect(client)
    return client, cloud, transport


def _views(step) -> tuple[set[str], set[str]]:
    """The step's ctx keys and the head scope's value names (empty when no step is in flight)."""
    if step is None:
        return set(), set()
    head = step.ctx.get("head")
    return set(step.ctx), set(head.values) if head is not None else set()


@pytest.mark.parametrize("mode,tail_input,keep_graphs", [("client", "pooled", False), ("he", "tokens", True)])
def test_dead_step_values_are_dropped_after_their_last_use(mode: str, tail_input: str, keep_graphs: bool,
                                                           secure_data: TokenizedDataset) -> None:
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", label_protection=mode,
                       tail_input=tail_input)
    client, cloud, transport = _parties(config, keep_graphs)

    seen: list[tuple[str, set[str], set[str], set[str]]] = []  # (party, items it handled, ctx keys, head values)
    client_handle, cloud_handle = client.handle, cloud.handle

    def on_client(message):
        reply = client_handle(message)
        sent = set(reply.items) if reply is not None else set()
        seen.append(("client", set(message.items) | sent, *_views(client._step)))
        return reply

    def on_cloud(message):
        reply = cloud_handle(message)
        sent = set(reply.items) if reply is not None else set()
        seen.append(("cloud", set(message.items) | sent, *_views(cloud._tenant("t0").step)))
        return reply

    client.handle, cloud.handle = on_client, on_cloud  # type: ignore[method-assign]
    batch = secure_data.collate(list(range(8)))
    before = {k: v.clone() for k, v in client.export_halves().items()}
    transport.run_step(client, batch, train=True)

    assert any(k != "head.A" and not torch.equal(before[k], v) for k, v in client.export_halves().items())
    f_opened = {"client": False, "cloud": False}
    grad_h_opened = {"client": False, "cloud": False}
    checked = 0
    for party, items, ctx_keys, head_values in seen:
        f_opened[party] = f_opened[party] or "open.f" in items
        grad_h_opened[party] = grad_h_opened[party] or "open.grad_h" in items
        if not ctx_keys:
            continue  # the step ended with this message
        if f_opened[party]:
            assert not {"y", "hB"} & head_values, (party, items)
            checked += 1
        if grad_h_opened[party]:
            assert not {"tail", "cls", "f", "_graph"} & ctx_keys, (party, items)
            checked += 1
    assert all(grad_h_opened.values()) and all(f_opened.values())
    assert checked >= 4


def test_released_values_keep_the_saved_step_small(secure_data: TokenizedDataset) -> None:
    """The client's saved step after ``dL/dh`` is opened holds no tail or classifier tensors."""
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", label_protection="client")
    client, _, transport = _parties(config)
    sizes: list[tuple[bool, int, int]] = []  # (dL/dh opened by now, step bytes, tail + cls bytes)
    client_handle = client.handle

    def on_client(message):
        reply = client_handle(message)
        step = client.state_dict(copy=False)["step"]
        if step is not None:
            opened = bool(sizes and sizes[-1][0]) or (reply is not None and "open.grad_h" in reply.items)
            sizes.append((opened, state_tensor_bytes(step), state_tensor_bytes(step["ctx"].get("tail"))
                          + state_tensor_bytes(step["ctx"].get("cls"))))
        return reply

    client.handle = on_client  # type: ignore[method-assign]
    transport.run_step(client, secure_data.collate(list(range(8))), train=True)
    before = [s for s in sizes if not s[0]]
    after = [s for s in sizes if s[0]]
    assert len(after) >= 2 and max(s[2] for s in before) > 0  # the head's backward saves as well
    assert all(s[2] == 0 for s in after)


def test_a_message_that_fails_after_a_release_rolls_it_back(secure_data: TokenizedDataset) -> None:
    """A later operation of the same message fails: the state is as before it, and the retry finishes."""
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", label_protection="client")
    client, _, transport = _parties(config)
    receive_grad_f, client_handle, failed = client._op_receive_grad_f, client.handle, []

    def fail_once(st, halves, got):  # runs in the message that released the tail (after open_grad_h)
        if not failed:
            failed.append(True)
            raise ValueError("injected")
        return receive_grad_f(st, halves, got)

    def on_client(message):
        before = client.state_dict(copy=True)
        try:
            return client_handle(message)
        except ProtocolError:
            after = client.state_dict(copy=True)
            assert set(after["step"]["ctx"]) == set(before["step"]["ctx"]) >= {"tail", "cls"}
            assert state_tensor_bytes(after) == state_tensor_bytes(before)
            return client_handle(message)

    client._op_receive_grad_f = fail_once  # type: ignore[method-assign]
    client.handle = on_client  # type: ignore[method-assign]
    step = transport.run_step(client, secure_data.collate(list(range(8))), train=True)
    assert failed and client.pop_result(step).loss is not None and client.counts == {"head": 1, "tail": 1, "loads": 0}
