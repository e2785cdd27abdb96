"""Stacked cloud body (CloudParty.handle_many): equal to per-message results, shared graphs,
partial and dropped gradients, chunking, all-or-nothing validation, and its use by the
Flower strategy (one call per stage for all tenants, fewer body forwards than micro-batches)."""

from __future__ import annotations

import weakref

import pytest
import torch
from flwr.app import Context, Message

from flower_split.apps.client_app import make_client_app
from flower_split.model import Body, build_split
from flower_split.model.adapters import pack_tokens, unpack_tokens
from flower_split.protocol import BodyGrad, BodyOutput, CloudParty, HeadGrad, HeadOutput, ProtocolError
from flower_split.apps.server_app import run_cloud
from flower_split.flower.records import pack_messages, read_metrics, unpack_messages
from flower_helpers import LocalGrid
from flower_split.flower.strategy_utils import RoundReport

DIM = 32  # hidden size of the tiny model
ONE_GROUP = dict(max_padding=float("inf"), keep_graphs=True)  # stack whatever the padding, keep the graph
SHAPES = [("a", 3, 7), ("b", 1, 12), ("c", 4, 5), ("a", 2, 12), ("d", 5, 9)]  # tenant, rows, tokens


@pytest.fixture(scope="module")
def body() -> Body:
    return build_split("tiny", 77, 4, 8).body


def _heads(train: bool = True) -> list[HeadOutput]:
    """Micro-batches of several tenants, different rows and token lengths, some padded."""
    generator = torch.Generator().manual_seed(0)
    heads = []
    for step, (tenant, rows, tokens) in enumerate(SHAPES):
        mask = torch.ones(rows, tokens, dtype=torch.long)
        if rows > 1:
            mask[0, tokens - 2:] = 0  # the message's own padding (another row is the longest)
        f = torch.randn(rows, tokens, DIM, generator=generator)
        heads.append(HeadOutput(tenant, step, pack_tokens(f, mask), mask, train))  # f at the real tokens
    return heads


def _full(head: HeadOutput) -> torch.Tensor:
    """A head output's f at every position [B, T, d] (zero at the padding), as the body runs it."""
    return unpack_tokens(head.f, head.attention_mask)


def _grads(heads: list[HeadOutput]) -> list[BodyGrad]:
    """A random body-output gradient for each of ``heads``."""
    generator = torch.Generator().manual_seed(1)
    return [BodyGrad(h.tenant, h.step, torch.randn((*h.attention_mask.shape, DIM), generator=generator))
            for h in heads]


def _reference(body: Body, head: HeadOutput, grad: BodyGrad) -> tuple[torch.Tensor, torch.Tensor]:
    """The body output and input gradient (at the real tokens) of one message on its own."""
    f = _full(head).requires_grad_(True)
    h = body(f, head.attention_mask)
    (grad_f,) = torch.autograd.grad(h, f, grad.grad_h)
    return h.detach(), pack_tokens(grad_f, head.attention_mask)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, graphs", [
    (ONE_GROUP, 1),
    (dict(max_padding=float("inf")), 0),  # default: recomputed at the gradient, no graph kept
    (dict(max_stack_rows=4), 0),  # recomputed in several groups
])
def test_stacked_forward_and_backward_equal_per_message(body: Body, options: dict, graphs: int) -> None:
    cloud = CloudParty(body, **options)
    heads, grads = _heads(), _grads(_heads())
    outputs = cloud.handle_many(heads)
    assert cloud.graphs_held == graphs and len(cloud.pending_steps) == len(heads)
    replies = cloud.handle_many(grads)
    assert cloud.pending_steps == [] and cloud.graphs_held == 0
    for head, grad, output, reply in zip(heads, grads, outputs, replies):
        h, grad_f = _reference(body, head, grad)
        assert isinstance(output, BodyOutput) and (output.tenant, output.step) == (head.tenant, head.step)
        assert isinstance(reply, HeadGrad) and (reply.tenant, reply.step) == (head.tenant, head.step)
        assert _close(output.h, h) and _close(reply.grad_f, grad_f)


@pytest.mark.parametrize("options", [ONE_GROUP, dict(max_padding=float("inf")), dict(max_stack_rows=4)])
def test_pooled_messages_get_the_masked_mean_and_its_gradient_mixed_with_per_token_ones(body, options) -> None:
    """``HeadOutput.pool``: the cloud answers with the masked mean of h over the message's real
    tokens [B, d] and takes dL/d(mean h) [B, d]; dL/df is what the per-token gradient
    masked_mean_backward(g) gives, with kept graphs and recomputed ones, stacked beside
    per-token messages of other tenants. A per-token-shaped gradient for a pooled step is refused."""
    from dataclasses import replace

    from flower_split.model.adapters import masked_mean, masked_mean_backward

    cloud = CloudParty(body, **options)
    heads = [replace(h, pool=i % 2 == 0) for i, h in enumerate(_heads())]
    generator = torch.Generator().manual_seed(2)
    grads = [BodyGrad(h.tenant, h.step, torch.randn((h.attention_mask.shape[0], DIM) if h.pool
                                                    else (*h.attention_mask.shape, DIM), generator=generator))
             for h in heads]
    outputs = cloud.handle_many(heads)
    with pytest.raises(ProtocolError, match="grad_h"):
        cloud.handle(BodyGrad(heads[0].tenant, heads[0].step, torch.zeros((*heads[0].attention_mask.shape, DIM))))
    replies = cloud.handle_many(grads)
    for head, grad, output, reply in zip(heads, grads, outputs, replies):
        per_token = masked_mean_backward(grad.grad_h, head.attention_mask) if head.pool else grad.grad_h
        h, grad_f = _reference(body, head, BodyGrad(head.tenant, head.step, per_token))
        assert _close(output.h, masked_mean(h, head.attention_mask) if head.pool else h)
        assert _close(reply.grad_f, grad_f)
    assert cloud.pending_steps == [] and cloud.graphs_held == 0


def test_a_batch_padded_past_its_longest_sequence_or_the_body_limit_is_refused(body: Body) -> None:
    """f travels at the real tokens but the body runs on every position: padding is nearly free
    to send, so the cloud refuses a mask wider than the batch's longest sequence (a 4096-wide
    mask with one real token would make it run and hold 4096 positions of d floats) and one
    longer than the body's position limit."""
    cloud = CloudParty(body)
    mask = torch.zeros(1, 4096, dtype=torch.long)
    mask[0, 0] = 1
    with pytest.raises(ProtocolError, match="longest sequence has 1 tokens"):
        cloud.handle(HeadOutput("a", 0, torch.zeros(1, DIM), mask, True))
    limit = body.encoder.config.max_position_embeddings
    with pytest.raises(ProtocolError, match=f"at most {limit}"):
        cloud.handle(HeadOutput("a", 0, torch.zeros(limit + 1, DIM), torch.ones(1, limit + 1, dtype=torch.long), True))
    assert cloud.pending_steps == []


def test_stacked_inference_equals_per_message_and_keeps_nothing(body: Body) -> None:
    cloud = CloudParty(body)
    heads = _heads(train=False)
    for head, output in zip(heads, cloud.handle_many(heads)):
        with torch.no_grad():
            assert _close(output.h, body(_full(head), head.attention_mask))
    assert cloud.pending_steps == [] and cloud.graphs_held == 0


@pytest.mark.parametrize("keep_graphs", [True, False])
def test_gradients_one_at_a_time_while_others_are_pending(body: Body, keep_graphs: bool) -> None:
    cloud = CloudParty(body, max_padding=float("inf"), keep_graphs=keep_graphs)
    heads, grads = _heads(), _grads(_heads())
    cloud.handle_many(heads)
    for i, (head, grad) in enumerate(zip(heads, grads)):
        reply = cloud.handle(grad)
        assert _close(reply.grad_f, _reference(body, head, grad)[1])
        assert cloud.graphs_held == (1 if keep_graphs and i < len(heads) - 1 else 0)
        assert len(cloud.pending_steps) == len(heads) - i - 1


def test_dropped_tenant_does_not_disturb_the_others_and_frees_the_last_group(body: Body) -> None:
    cloud = CloudParty(body, **ONE_GROUP)
    heads, grads = _heads(), _grads(_heads())
    cloud.handle_many(heads)
    cloud.drop_tenant("b")
    kept = [(h, g) for h, g in zip(heads, grads) if h.tenant in ("a", "c")]
    for (head, grad), reply in zip(kept, cloud.handle_many([g for _, g in kept])):
        assert _close(reply.grad_f, _reference(body, head, grad)[1])
    assert cloud.pending_steps == [("d", 4)] and cloud.graphs_held == 1
    graph = weakref.ref(cloud._pending[("d", 4)].group.h)
    cloud.drop_tenant("d")  # the last member: the shared graph goes with it
    assert cloud.graphs_held == 0 and graph() is None


@pytest.mark.parametrize("bounds, groups", [
    (dict(max_stack_rows=4, max_padding=float("inf")), 4),  # shortest first: rows 4 | 3 | 5 (alone) | 1+2
    (dict(max_padding=0.25), 3),  # tokens 5+7 | 9 | 12+12
    (dict(max_padding=0.0), 4),  # equal lengths only: 5 | 7 | 9 | 12+12
])
def test_groups_within_rows_and_padding_bounds_give_the_same_results(body: Body, bounds: dict,
                                                                     groups: int) -> None:
    heads, grads = _heads(), _grads(_heads())
    whole, grouped = CloudParty(body, **ONE_GROUP), CloudParty(body, keep_graphs=True, **bounds)
    outputs = whole.handle_many(heads), grouped.handle_many(heads)
    assert whole.graphs_held == 1 and grouped.graphs_held == groups
    replies = whole.handle_many(grads), grouped.handle_many(grads)
    for a, b in zip(*outputs):
        assert _close(a.h, b.h)
    for a, b in zip(*replies):
        assert _close(a.grad_f, b.grad_f)
    assert grouped.graphs_held == 0


def test_a_bad_message_rejects_the_whole_call_and_changes_nothing(body: Body) -> None:
    cloud = CloudParty(body, max_pending=6, **ONE_GROUP)
    heads = _heads()
    bad = HeadOutput("c", 9, heads[0].f.double(), heads[0].attention_mask, True)
    with pytest.raises(ProtocolError, match=r"HeadOutput \(tenant 'c', step 9\): f: expected dtype"):
        cloud.handle_many(heads + [bad])
    with pytest.raises(ProtocolError, match=r"\(tenant 'a', step 0\): the same step twice in one call"):
        cloud.handle_many(heads + heads[:1])
    assert cloud.pending_steps == []
    cloud.handle_many(heads)
    grads = _grads(heads)
    with pytest.raises(ProtocolError, match="6 steps already in flight"):
        cloud.handle_many([HeadOutput("e", 0, heads[0].f, heads[0].attention_mask, True),
                           HeadOutput("e", 1, heads[0].f, heads[0].attention_mask, True)])
    with pytest.raises(ProtocolError, match=r"BodyGrad \(tenant 'd', step 4\): grad_h: expected shape"):
        cloud.handle_many(grads[:4] + [BodyGrad("d", 4, grads[0].grad_h)])
    with pytest.raises(ProtocolError, match="no matching forward"):
        cloud.handle_many(grads[:1] + [BodyGrad("a", 99, grads[0].grad_h)])
    assert len(cloud.pending_steps) == len(heads) and cloud.graphs_held == 1
    cloud.check(grads[:2], admitted=grads[2:])
    with pytest.raises(ProtocolError, match="twice in one call"):
        cloud.check(grads[:1], admitted=grads[:1])


def test_strategy_runs_the_body_once_per_stage_and_isolates_a_bad_pack(
        task_identity: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], int, int]] = []  # (kind:tenant of the messages, head outputs, their rows)
    forwards: list[int] = []  # rows of each body forward
    handle_many, forward = CloudParty.handle_many, Body.forward

    def spy_handle_many(self: CloudParty, messages: list) -> list:
        heads = [m for m in messages if isinstance(m, HeadOutput)]
        grads = [m for m in messages if isinstance(m, BodyGrad)]
        calls.append((sorted({f"{type(m).__name__}:{m.tenant}" for m in messages}), len(heads),
                      sum(m.attention_mask.shape[0] for m in heads), len(grads), sum(m.grad_h.shape[0] for m in grads)))
        return handle_many(self, messages)

    def spy_forward(self: Body, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        forwards.append(f.shape[0])
        return forward(self, f, mask)

    monkeypatch.setattr(CloudParty, "handle_many", spy_handle_many)
    monkeypatch.setattr(Body, "forward", spy_forward)
    config = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 8, "tail-bottleneck": 16,
              "batch-size": 32, "max-train-samples": 320, "max-test-samples": 64, "local-steps": 4,
              "micro-batches": 2, "num-server-rounds": 1, "eval-every": 0, "global-eval": False,
              "min-nodes": 3, "reply-timeout": 60.0}
    client_app = make_client_app(config)

    def corrupt_tenant_1(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if context.node_id == 2 and message.metadata.message_type == "train.tail":
            grads = unpack_messages(reply.content, BodyGrad, "tenant-1")
            wrong = [BodyGrad(g.tenant, g.step, g.grad_h[:, :1].contiguous()) for g in grads]
            reply.content = pack_messages(BodyGrad, "tenant-1", wrong, read_metrics(reply.content))
        return reply

    reports: list = []
    run_cloud(LocalGrid(corrupt_tenant_1, 3), config, reports.append)
    report = reports[0]
    assert isinstance(report, RoundReport) and report.steps == 4
    assert report.tenants == ["tenant-0", "tenant-2"] and "grad_h: expected shape" in report.dropped["tenant-1"]
    everyone = [f"HeadOutput:tenant-{i}" for i in range(3)]
    assert [call[0] for call in calls[:4]] == [everyone, ["BodyGrad:tenant-0", "BodyGrad:tenant-2"],
                                               everyone[::2], ["BodyGrad:tenant-0", "BodyGrad:tenant-2"]]
    assert calls[0][1] == 6  # all three tenants' two micro-batches in one call
    # every row through the body once forward and once again at its gradient (no graph kept),
    # stacked: fewer body forwards than messages
    assert sum(forwards) == sum(call[2] + call[4] for call in calls)
    assert len(forwards) < sum(call[1] + call[3] for call in calls)
