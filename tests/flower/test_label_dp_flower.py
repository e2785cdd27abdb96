"""Label-DP over Flower (split-plain): the tenant reports its own epsilon, from label uses kept
in its state between messages (every message is handled by a freshly loaded party)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from flower_split.apps.client_app import make_client_app
from flower_split.flower.contract import MetricKey, RecordKey
from flower_split.flower.records import pack_messages, unpack_messages
from flower_split.model import build_split
from flower_split.protocol import BodyOutput, CloudParty, HeadOutput
from flower_split.protocol.dp_accountant import label_dp_epsilon
from flower_helpers import LocalGrid

CONFIG = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 8, "tail-bottleneck": 16,
          "batch-size": 16, "max-train-samples": 64, "max-test-samples": 32, "local-steps": 2,
          "micro-batches": 2, "num-server-rounds": 1, "min-nodes": 1, "label-dp-noise": 2.0,
          "label-dp-delta": 1e-6}


def test_plain_tenant_reports_its_label_dp_epsilon_from_counted_uses(task_identity: None) -> None:
    grid = LocalGrid(make_client_app(CONFIG), 1)
    cloud = CloudParty(build_split("tiny", 77, 8, 16).body)
    reported = []
    for _ in range(3):  # 3 stages of 2 batches of 16 over 64 examples: the stream wraps in the 3rd
        forward = Message(RecordDict({"config": ConfigRecord({"num-batches": 2})}), 1, "train.head_fwd")
        heads = unpack_messages(grid.send_and_receive([forward])[0].content, HeadOutput, "tenant-0")
        outputs = [cloud.handle(head) for head in heads]
        reply = grid.send_and_receive([Message(pack_messages(BodyOutput, "tenant-0", outputs), 1, "train.tail")])[0]
        assert not reply.has_error(), reply.error
        metrics = reply.content[RecordKey.METRICS]
        reported.append(metrics[MetricKey.LABEL_DP_EPSILON])
        # the loss depends on the labels and is not noised: under label-DP it never leaves the tenant
        assert MetricKey.TRAIN_LOSS not in metrics and metrics[MetricKey.NUM_EXAMPLES] == 32
    assert reported[:2] == [label_dp_epsilon(2.0, 1, 1e-6)] * 2
    assert reported[2] == label_dp_epsilon(2.0, 2, 1e-6)


def test_label_dp_round_reports_no_loss_and_refuses_the_stop_rule(task_identity: None) -> None:
    from flower_split.apps.server_app import run_cloud
    from flower_split.backends import backend_for
    from flower_split.config import ConfigError
    from flower_split.flower.settings import settings_from_run_config

    rounds = []
    run_cloud(LocalGrid(make_client_app(CONFIG), 1), {**CONFIG, "global-eval": False}, rounds.append)
    train = [r for r in rounds if type(r).__name__ == "RoundReport"]
    assert train and train[0].train_loss is None and train[0].num_examples == 32
    with pytest.raises(ConfigError, match="^target-loss: under label-DP"):
        backend_for(*settings_from_run_config({**CONFIG, "target-loss": 1.0}))


def test_rounds_report_each_tenants_epsilon_plain_and_secure(task_identity: None, tmp_path) -> None:
    """The round reports (and so results.json) carry every tenant's epsilon after the round, in
    both security levels; a secure tenant counts its label uses in its saved state, so the
    epsilon grows across rounds although every message rebuilds the party."""
    from flower_split.apps.server_app import run_cloud

    secure = {**CONFIG, "security": "secure", "label-protection": "client", "head-rank": 4, "tail-bottleneck": 8,
              "local-steps": 2, "num-server-rounds": 3, "global-eval": False, "eval-every": 0}
    for config, grid in ((CONFIG, LocalGrid(make_client_app(CONFIG), 1)),
                         (secure, LocalGrid(make_client_app(secure), 1, dealer=tmp_path))):
        reports = []
        run_cloud(grid, {**config, "global-eval": False}, reports.append)
        rounds = [r for r in reports if type(r).__name__ == "RoundReport"]
        epsilons = [r.label_dp_epsilon["tenant-0"] for r in rounds]
        steps = config["local-steps"] * config.get("num-server-rounds", 1)
        uses = -(-steps * config["batch-size"] // 64)  # 64 examples, every batch a fresh slice
        assert epsilons[-1] == pytest.approx(label_dp_epsilon(2.0, uses, 1e-6)), config.get("security")
        assert epsilons == sorted(epsilons)


def test_a_tenants_randomized_labels_stay_fixed_across_messages() -> None:
    """The randomized-response key lives in the tenant's Context.state: every message (a fresh
    process in deployment) sees the same randomized labels, so no label is drawn twice."""
    from flwr.app import Context

    from flower_split.flower.settings import settings_from_run_config
    from flower_split.flower.tenant import Cursor, randomized_labels, tenant_data, train_batches

    config, settings = settings_from_run_config({**CONFIG, "label-dp-noise": 0.0, "label-rr-epsilon": 1.0})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config={})
    data = tenant_data(config, settings, context.node_config)
    draws = [train_batches(data, config, Cursor(), 4, randomized_labels(context, config, data)) for _ in range(2)]
    true = train_batches(data, config, Cursor(), 4)
    noisy = [torch.cat([b.labels for b in batches]) for batches in draws]
    truth = torch.cat([b.labels for b in true])
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], truth)
    assert list(context.state.keys()) == ["label-rr"]



def _first_views(grid: LocalGrid, parts, stages: int = 1) -> dict[bytes, list[torch.Tensor]]:
    """Every ``f`` row the tenant sends in ``stages`` training stages, by the text's real token
    ids (read back by nearest token: sigma is small in these tests), at any padded width."""
    from flower_split.audit.inversion import NearestTokenAttack
    from flower_split.audit.transcript import StepView
    from flower_split.audit.vocabulary import VocabularyTable
    from flower_split.model.adapters import pack_tokens, unpack_tokens

    cloud, reader = CloudParty(parts.body), NearestTokenAttack(VocabularyTable(parts.embedder))
    sent: dict[bytes, list[torch.Tensor]] = {}
    for _ in range(stages):
        forward = Message(RecordDict({"config": ConfigRecord({"num-batches": 2})}), 1, "train.head_fwd")
        heads = unpack_messages(grid.send_and_receive([forward])[0].content, HeadOutput, "tenant-0")
        full = [unpack_tokens(h.f, h.attention_mask) for h in heads]  # f travels at the real tokens
        ids = reader.guess([StepView("tenant-0", h.step, True, f=f, attention_mask=h.attention_mask)
                            for h, f in zip(heads, full)]).ids
        for head, per_token, texts in zip(heads, full, ids):
            assert float((head.f - pack_tokens(parts.embedder(texts), head.attention_mask)).abs().max()) > 1e-4
            for text, f, real in zip(texts, per_token, head.attention_mask.bool()):
                sent.setdefault(text[real].numpy().tobytes(), []).append(f[real])
        outputs = [cloud.handle(head) for head in heads]
        reply = grid.send_and_receive([Message(pack_messages(BodyOutput, "tenant-0", outputs), 1, "train.tail")])[0]
        assert not reply.has_error(), reply.error
    return sent


INPUT_NOISE = {**CONFIG, "label-dp-noise": 0.0, "input-noise": 0.01, "train-head": False}


def test_a_tenants_input_noise_is_one_draw_per_text_across_messages(task_identity: None) -> None:
    """Input noise over Flower: its key lives in the tenant's saved state, so a text that comes
    round again in a later message (a freshly loaded party, another batch, another padded
    width) is sent with the same noise, and the cloud has nothing to average."""
    sent = _first_views(LocalGrid(make_client_app(INPUT_NOISE), 1), build_split("tiny", 77, 8, 16), stages=3)
    again = [fs for fs in sent.values() if len(fs) > 1]  # 3 stages of 2 x 16 over 64 rows: the stream wraps
    assert again and all(torch.equal(fs[0], f) for fs in again for f in fs[1:])


def test_a_node_key_gives_a_new_session_the_same_noise_and_the_floor_holds(task_identity: None, tmp_path) -> None:
    """Node config ``input-noise-key``: a second session (fresh state, as a cloud that restarts
    the run would make) sends every text with the noise of the first; without the key file it
    would be a fresh draw. Node config ``input-noise`` above the run's sigma: refused."""
    parts = build_split("tiny", 77, 8, 16)
    node = {"input-noise-key": str(tmp_path / "noise.json")}
    first = _first_views(LocalGrid(make_client_app(INPUT_NOISE), 1, node_config=node), parts)
    second = _first_views(LocalGrid(make_client_app(INPUT_NOISE), 1, node_config=node), parts)
    unkeyed = _first_views(LocalGrid(make_client_app(INPUT_NOISE), 1), parts)
    shared = set(first) & set(second) & set(unkeyed)
    assert shared and all(torch.equal(first[t][0], second[t][0]) for t in shared)
    assert not any(torch.equal(first[t][0], unkeyed[t][0]) for t in shared)
    grid = LocalGrid(make_client_app(INPUT_NOISE), 1, node_config={"input-noise": 1.0})
    forward = Message(RecordDict({"config": ConfigRecord({"num-batches": 2})}), 1, "train.head_fwd")
    reply = grid.send_and_receive([forward])[0]
    assert reply.has_error() and "below this tenant's node config input-noise" in reply.error.reason
