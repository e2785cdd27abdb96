"""Label-DP over Flower (split-plain): the tenant reports its own epsilon, from label uses kept
in its state between messages (every message is handled by a freshly loaded party)."""

from __future__ import annotations

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
        reported.append(reply.content[RecordKey.METRICS][MetricKey.LABEL_DP_EPSILON])
    assert reported[:2] == [label_dp_epsilon(2.0, 1, 1e-6)] * 2
    assert reported[2] == label_dp_epsilon(2.0, 2, 1e-6)
