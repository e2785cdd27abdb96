"""issue 17, gap 2: a secure round that would start while the dealer node is down waits for it
(up to node-wait-timeout) instead of failing every step; a dealer SuperNode back under a new
node id is found again under the pinned dealer key (in-process grid, real ClientApps)."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, Message, RecordDict

from flower_helpers import LocalGrid
from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.strategy_utils import EvalReport, RoundReport

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECURE = {"model": "tiny", "device": "cpu", "partition": "iid", "head-rank": 4, "tail-bottleneck": 8,
          "lr-tail": 0.5, "batch-size": 16, "max-length": 24, "max-train-samples": 64, "max-test-samples": 16,
          "local-steps": 2, "num-server-rounds": 2, "eval-every": 0, "min-nodes": 2, "reply-timeout": 60.0,
          "security": "secure", "label-protection": "client", "global-eval": False, "node-wait-timeout": 30.0}


class DealerOutage(LocalGrid):
    """A grid whose dealer node is down for the next ``outage`` calls of ``get_node_ids`` once
    :meth:`kill` is called: absent from the node list, and no reply to what is sent to it. It
    comes back under ``back_as`` (a new node id, a fresh context: a restarted SuperNode) or,
    None, under its own id."""

    def __init__(self, *args: object, back_as: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.down, self.back_as, self.calls_while_down = 0, back_as, 0

    def kill(self, outage: int) -> None:
        self.down = outage
        self.contexts[self.dealer_node].state = RecordDict()  # its state is lost with the process

    def get_node_ids(self) -> list[int]:
        if not self.down:
            return list(self.contexts)
        self.down -= 1
        self.calls_while_down += 1
        nodes = [n for n in self.contexts if n != self.dealer_node]
        if not self.down and self.back_as is not None:  # it restarts, to be listed at the next call
            old = self.contexts.pop(self.dealer_node)
            self.contexts[self.back_as] = Context(run_id=1, node_id=self.back_as, state=RecordDict(),
                                                  node_config=dict(old.node_config), run_config={})
            self.dealer_node = self.back_as
        return nodes

    def deliver(self, message: Message) -> Message | None:
        if self.down and message.metadata.dst_node_id == self.dealer_node:
            return None
        if message.metadata.dst_node_id not in self.contexts:
            return None  # a node id that no longer exists
        return super().deliver(message)


@pytest.mark.parametrize("back_as", [None, 9])
def test_a_round_waits_for_the_dealer_node(task_identity: None, tmp_path, caplog, back_as: int | None) -> None:
    keys = tmp_path / "keys"
    config = {**SECURE, **({"expected-dealer-key": str(keys / "dealer.pub")} if back_as else {})}
    grid = DealerOutage(make_client_app(config), 2, dealer=keys, node_config={"state-dir": str(tmp_path / "nodes")},
                        back_as=back_as)
    reports: list[RoundReport | EvalReport] = []

    def on_report(report: RoundReport | EvalReport) -> None:
        reports.append(report)
        if isinstance(report, RoundReport) and report.server_round == 1:
            grid.kill(outage=3)  # down when round 2 selects its nodes

    with caplog.at_level(logging.INFO, logger="flwr"):
        run_cloud(grid, config, on_report)
    rounds = [r for r in reports if isinstance(r, RoundReport)]
    assert rounds[1].steps == 2 and not rounds[1].dropped and rounds[1].tenants == ["tenant-0", "tenant-1"]
    assert grid.calls_while_down == 3  # round 2 started once the dealer node was listed again
    assert "the dealer node 3 is not connected: the round waits for it" in caplog.text
    if back_as is not None:
        assert "node 9 is the dealer again (pinned key proven)" in caplog.text
    evaluation = [r for r in reports if isinstance(r, EvalReport)][-1]
    assert sorted(evaluation.per_tenant) == ["tenant-0", "tenant-1"] and not evaluation.dropped


def test_a_dealer_node_that_never_comes_back_times_the_round_out(task_identity: None, tmp_path) -> None:
    config = {**SECURE, "node-wait-timeout": 2.0}
    grid = DealerOutage(make_client_app(config), 2, dealer=tmp_path / "keys",
                        node_config={"state-dir": str(tmp_path / "nodes")})

    def on_report(report: RoundReport | EvalReport) -> None:
        if isinstance(report, RoundReport) and report.server_round == 1:
            grid.kill(outage=1000)

    with pytest.raises(TimeoutError, match="the dealer node 3 is not connected"):
        run_cloud(grid, config, on_report)
