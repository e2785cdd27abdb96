"""Split-plain protocol: message validation, ordering, state consistency, frozen body."""

from __future__ import annotations

import pytest
import torch

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset, load_dataset
from flower_split.model import InitRandom, build_split, load_tokenizer
from flower_split.protocol import (
    BodyGrad, BodyOutput, ClientParty, CloudParty, HeadGrad, HeadOutput, ProtocolError, TrainingDiverged,
)
from flower_split.transport import InProcessTransport


@pytest.fixture()
def setup():
    config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu").validate()
    train, _ = load_dataset("banking77")
    data = TokenizedDataset(train.subset(list(range(64))), load_tokenizer("tiny"), 32)
    parts = build_split("tiny", 77, 4, 8)
    cloud = CloudParty(parts.body)
    client = ClientParty("t0", parts.embedder, parts.head, parts.tail, config, total_steps=10)
    return client, cloud, data, parts


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_full_step_updates_both_adapters_never_the_body(setup) -> None:
    client, cloud, data, parts = setup
    head, tail, body = _snapshot(parts.head), _snapshot(parts.tail), parts.body.fingerprint()
    transport = InProcessTransport(cloud, record_transcript=True)
    message = client.begin(data.collate(list(range(8))))
    kinds = []
    while message is not None:
        reply = transport.send(message)
        kinds.append((type(message).__name__, type(reply).__name__))
        message = client.handle(reply)
    assert kinds == [("HeadOutput", "BodyOutput"), ("BodyGrad", "HeadGrad")]
    assert not _same(head, parts.head.state_dict()) and not _same(tail, parts.tail.state_dict())
    assert parts.body.fingerprint() == body
    assert cloud.pending_steps == []


def test_transcript_holds_no_tokens_or_labels(setup) -> None:
    client, cloud, data, _ = setup
    transport = InProcessTransport(cloud, record_transcript=True)
    batch = data.collate(list(range(8)))
    message = client.begin(batch)
    while message is not None:
        message = client.handle(transport.send(message))
    for received in transport.transcript:
        for name in ("input_ids", "labels", "loss"):
            assert not hasattr(received, name)
        tensors = [v for v in vars(received).values() if isinstance(v, torch.Tensor)]
        assert all(t.dtype != torch.long or t.shape != batch.labels.shape for t in tensors)
        assert all(not torch.equal(t, batch.input_ids) for t in tensors if t.shape == batch.input_ids.shape)


def test_out_of_order_and_malformed_messages_leave_state_unchanged(setup) -> None:
    client, cloud, data, parts = setup
    batch = data.collate(list(range(4)))
    forward = client.begin(batch)
    head, tail = _snapshot(parts.head), _snapshot(parts.tail)
    width = forward.f.shape[1]
    bad_replies = [
        HeadGrad("t0", forward.step, torch.zeros(4, width, 32)),           # wrong stage
        BodyOutput("t0", forward.step + 5, torch.zeros(4, width, 32)),     # unknown step
        BodyOutput("other", forward.step, torch.zeros(4, width, 32)),      # wrong tenant
        BodyOutput("t0", forward.step, torch.zeros(4, width, 31)),         # wrong shape
        BodyOutput("t0", forward.step, torch.zeros(4, width, 32, dtype=torch.float64)),  # wrong dtype
        BodyOutput("t0", forward.step, torch.full((4, width, 32), float("nan"))),
    ]
    for reply in bad_replies:
        with pytest.raises(ProtocolError):
            client.handle(reply)
    assert _same(head, parts.head.state_dict()) and _same(tail, parts.tail.state_dict())
    # the step can still complete normally afterwards
    grad = client.handle(cloud.handle(forward))
    assert isinstance(grad, BodyGrad)
    assert client.handle(cloud.handle(grad)) is None


def test_cloud_rejects_bad_messages_without_state_change(setup) -> None:
    client, cloud, data, _ = setup
    forward = client.begin(data.collate(list(range(4))))
    with pytest.raises(ProtocolError, match="no matching forward"):
        cloud.handle(BodyGrad("t0", forward.step, torch.zeros_like(forward.f)))
    with pytest.raises(ProtocolError, match="expected shape"):
        cloud.handle(HeadOutput("t0", 0, forward.f[..., :5].contiguous(), forward.attention_mask, True))
    with pytest.raises(ProtocolError, match="dtype"):
        cloud.handle(HeadOutput("t0", 0, forward.f.double(), forward.attention_mask, True))
    with pytest.raises(ProtocolError, match="attention_mask"):
        cloud.handle(HeadOutput("t0", 0, forward.f, forward.attention_mask * 2, True))
    with pytest.raises(ProtocolError, match="f: expected shape"):  # f must hold one row per real token
        cloud.handle(HeadOutput("t0", 0, forward.f, forward.attention_mask[:, :1], True))
    assert cloud.pending_steps == []
    cloud.handle(forward)
    with pytest.raises(ProtocolError, match="already in flight"):
        cloud.handle(forward)
    assert cloud.pending_steps == [("t0", forward.step)]
    cloud.drop_tenant("t0")
    assert cloud.pending_steps == []


def test_inference_step_keeps_nothing_on_the_cloud(setup) -> None:
    client, cloud, data, _ = setup
    forward = client.begin(data.collate(list(range(4))), train=False)
    assert not forward.train
    assert client.handle(cloud.handle(forward)) is None
    assert cloud.pending_steps == []
    assert client.pop_result(forward.step).logits.shape == (4, 77)


def test_frozen_head_sends_no_gradient(setup) -> None:
    _, cloud, data, parts = setup
    config = RunConfig(model="tiny", train_head=False).validate()
    client = ClientParty("t0", parts.embedder, parts.head, parts.tail, config, total_steps=4)
    forward = client.begin(data.collate(list(range(4))))
    assert not forward.train
    assert client.handle(cloud.handle(forward)) is None  # nothing label-dependent leaves the client


def test_a_non_finite_loss_is_refused_before_any_update(setup) -> None:
    client, cloud, data, parts = setup
    with torch.no_grad():
        parts.tail.classifier.weight.fill_(3e38)  # logits overflow: loss inf or nan
    tail, head = _snapshot(parts.tail), _snapshot(parts.head)
    message = client.begin(data.collate(list(range(8))))
    reply = cloud.handle(message)
    with pytest.raises(TrainingDiverged, match="training diverged .* lower lr_head / lr_tail"):
        client.handle(reply)
    assert _same(tail, parts.tail.state_dict()) and _same(head, parts.head.state_dict())


def test_classifier_learning_rate_scales_only_the_classifier_update() -> None:
    """``lr_classifier`` = 2 x ``lr_tail`` doubles the classifier's first SGD step and leaves the
    adapters' steps as they are (the first momentum step is ``lr * factor * g``)."""
    train, _ = load_dataset("banking77")
    data = TokenizedDataset(train.subset(list(range(8))), load_tokenizer("tiny"), 32)
    updates = []
    for lr_classifier in (None, 0.2):
        config = RunConfig(model="tiny", head_rank=4, tail_bottleneck=8, device="cpu", lr_tail=0.1,
                           lr_classifier=lr_classifier).validate()
        parts = build_split("tiny", 77, 4, 8, rng=InitRandom.insecure_from_seed(0))  # the same start twice
        before = {**_snapshot(parts.head), **{f"tail.{k}": v for k, v in _snapshot(parts.tail).items()}}
        client = ClientParty("t0", parts.embedder, parts.head, parts.tail, config, total_steps=10)
        transport = InProcessTransport(CloudParty(parts.body))
        message = client.begin(data.collate(list(range(8))))
        while message is not None:
            message = client.handle(transport.send(message))
        after = {**parts.head.state_dict(), **{f"tail.{k}": v for k, v in parts.tail.state_dict().items()}}
        updates.append({k: after[k] - before[k] for k in before})
    default, doubled = updates
    moved = {name for name in default if default[name].abs().max() > 0}  # B = 0: the A's get no gradient yet
    assert {"tail.classifier.weight", "tail.adapter.up.weight"} <= moved, \
        f"only {sorted(moved)} moved: the test would be blind"
    for name in default:
        expected = 2 * default[name] if name.startswith("tail.classifier") else default[name]
        assert torch.allclose(doubled[name], expected, rtol=1e-4, atol=1e-6), name  # float32 weights


def test_classifier_learning_rate_is_validated() -> None:
    with pytest.raises(ValueError, match="^lr_classifier"):
        RunConfig(lr_classifier=0.0).validate()
    assert RunConfig(lr_tail=0.3).classifier_lr == 0.3
    assert RunConfig(lr_tail=0.3, lr_classifier=0.7).classifier_lr == 0.7
