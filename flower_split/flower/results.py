"""The results.json entry of a Flower run, from the ServerApp's reports and the cost meters.

:class:`Collector` meters the ServerApp's grid (:class:`MeteredGrid`) and collects every
report of the strategy; :func:`run_entry` turns them into one ``results.json`` run. Used by
``flower-split simulate`` (with a warm-up of every node first, and a line per round) and by
the deployed ServerApp (``results-dir``; no warm-up, no client CPU figures: a deployed
ClientApp carries no cost meter). A FedAvg-family run that saves its state after every round
saves the collector's with it (:meth:`Collector.state_dict`), so a resumed run's entry covers
every round and all its costs (:mod:`flower_split.flower.fedavg_checkpoint`).
"""

from __future__ import annotations


import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable

from flwr.serverapp import Grid

from flower_split.config import RunConfig
from flower_split.flower.fedavg_reports import FedAvgEvalReport, FedAvgRoundReport, GlobalEvalReport
from flower_split.flower.metering import MeteredGrid, NodeCosts, Traffic
from flower_split.flower.settings import FlowerSettings


@dataclass
class Collected:
    """Reports of the ServerApp, each with the traffic of its phase."""

    rounds: list[tuple[Any, Traffic]] = field(default_factory=list)
    evaluations: list[tuple[Any, Traffic]] = field(default_factory=list)
    global_evaluations: list[Any] = field(default_factory=list)
    personalized: tuple[Any, Traffic] | None = None  # FedAvg family: the fine-tuning after the rounds
    grid: MeteredGrid | None = None
    warm_up: Traffic | None = None
    startup_seconds: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    server_peak_rss_bytes: int | None = None  # the ServerApp's process over the run (simulation: the engine's too)


# the reports a saved collector may hold (it is saved by FedAvg-family runs only)
SAVED_REPORTS = {cls.__name__: cls for cls in (FedAvgRoundReport, FedAvgEvalReport, GlobalEvalReport)}


def traffic_state(traffic: Traffic) -> dict[str, Any]:
    """``traffic`` as plain values (node ids as strings)."""
    return {"nodes": {str(node): asdict(costs) for node, costs in traffic.nodes.items()},
            "round_trips": traffic.round_trips, "dealer_nodes": sorted(traffic.dealer_nodes)}


def traffic_from_state(state: dict[str, Any]) -> Traffic:
    return Traffic(nodes={int(node): NodeCosts(**costs) for node, costs in state["nodes"].items()},
                   round_trips=int(state["round_trips"]), dealer_nodes={int(n) for n in state["dealer_nodes"]})


def _report_state(report: Any) -> dict[str, Any]:
    return {"type": type(report).__name__, "fields": asdict(report)}


def _report_from_state(state: dict[str, Any]) -> Any:
    return SAVED_REPORTS[state["type"]](**state["fields"])


def _printer(name: str, rounds: int, enabled: bool) -> Callable[[dict], None]:
    def emit(line: dict) -> None:
        if not enabled:
            return
        parts = [f"[{name}] round {line['round']}/{rounds}"]
        if line.get("train_loss") is not None:
            parts.append(f"train loss {line['train_loss']:.4f}")
        if line.get("test_accuracy") is not None:
            parts.append(f"per-tenant accuracy {line['test_accuracy']:.4f}")
        if line.get("test_macro_f1") is not None:
            parts.append(f"per-tenant macro-F1 {line['test_macro_f1']:.4f}")
        if line.get("global_test_accuracy") is not None:
            parts.append(f"global accuracy {line['global_test_accuracy']:.4f}")
        if line.get("bytes_up") is not None:
            parts.append(f"{line['bytes_up'] / 1e6:.2f} MB up / {line['bytes_down'] / 1e6:.2f} MB down per client")
        if line.get("wall_seconds") is not None:
            parts.append(f"{line['wall_seconds']:.1f} s")
        print(", ".join(parts), flush=True)

    return emit


class Collector:
    """Meters the ServerApp's grid and collects its reports, printing a line per finished round."""

    def __init__(self, name: str, strategy: str, settings: FlowerSettings, num_clients: int, progress: bool,
                 warm_up: Callable[[Grid, int, float], None] | None = None, global_model: bool = True) -> None:
        self.name, self.strategy, self.settings = name, strategy, settings
        self.global_model = global_model  # local-only has none, so no global-test evaluation
        self.num_clients, self.progress, self.warm_up = num_clients, progress, warm_up
        self.collected = Collected()
        self.emit = _printer(name, settings.num_server_rounds, progress)
        self.pending: dict[int, dict] = {}

    def wrap(self, grid: Grid) -> Grid:
        """The metered grid, once every client has warmed up (``warm_up``: start-up kept out of round 1)."""
        started = time.perf_counter()
        collected = self.collected
        collected.grid = MeteredGrid(grid)
        if self.warm_up is None:
            collected.started = started
            return collected.grid
        self.warm_up(collected.grid, self.num_clients, self.settings.reply_timeout)
        collected.warm_up = collected.grid.take()
        collected.startup_seconds = time.perf_counter() - started
        if self.progress:
            print(f"[{self.name}] {self.num_clients} clients ready after {collected.startup_seconds:.1f} s "
                  "(Ray actors started, model and data loaded)", flush=True)
        collected.started = time.perf_counter()
        return collected.grid

    def state_dict(self) -> dict[str, Any]:
        """What was collected so far, as plain values: every report with its traffic, the run's
        total traffic and the wall time since the warm-up."""
        collected = self.collected
        return {"rounds": [[_report_state(r), traffic_state(t)] for r, t in collected.rounds],
                "evaluations": [[_report_state(r), traffic_state(t)] for r, t in collected.evaluations],
                "global_evaluations": [_report_state(r) for r in collected.global_evaluations],
                "total": traffic_state(collected.grid.total if collected.grid else Traffic()),
                "seconds": time.perf_counter() - collected.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up a saved collector's reports and costs (a resumed run; its own start-up stays
        apart). Node ids change between runs: the saved costs stay under the old ids, and
        :func:`client_rows` sums a tenant's over all of them."""
        collected = self.collected
        collected.rounds = [(_report_from_state(r), traffic_from_state(t)) for r, t in state["rounds"]]
        collected.evaluations = [(_report_from_state(r), traffic_from_state(t)) for r, t in state["evaluations"]]
        collected.global_evaluations = [_report_from_state(r) for r in state["global_evaluations"]]
        if collected.grid is not None:
            total = traffic_from_state(state["total"])
            for node, costs in total.nodes.items():
                collected.grid.total.node(node).add(costs)
            collected.grid.total.round_trips += total.round_trips
            collected.grid.total.dealer_nodes |= total.dealer_nodes
        collected.started -= float(state["seconds"])
        collected.finished = time.perf_counter()  # a finished run started again reports no new round

    def evaluated(self, server_round: int) -> bool:
        if server_round == 0:
            return self.settings.eval_initial
        return server_round == self.settings.num_server_rounds or bool(
            self.settings.eval_every and server_round % self.settings.eval_every == 0)

    def global_due(self, server_round: int) -> bool:
        """Whether a global-test evaluation follows (FedAvg: every evaluated round; split: the last)."""
        last = server_round == self.settings.num_server_rounds
        return (self.settings.global_eval and self.global_model and self.evaluated(server_round)
                and (self.strategy == "fedavg" or last))

    def on_report(self, report: Any) -> None:
        """Collect a report; print the round's line once its last report is in."""
        kind, collected = type(report).__name__, self.collected
        if kind == "PersonalizedEvalReport":
            collected.personalized = (report, collected.grid.take())
            if self.progress:
                accuracy = "n/a" if report.accuracy is None else f"{report.accuracy:.4f}"
                print(f"[{self.name}] personalised ({report.epochs} local epochs after the last round): "
                      f"per-tenant accuracy {accuracy}", flush=True)
            return
        server_round = report.server_round
        line = self.pending.setdefault(server_round, {"round": server_round})
        complete = True
        if kind in ("RoundReport", "FedAvgRoundReport"):
            traffic = collected.grid.take()
            collected.rounds.append((report, traffic))
            line.update(train_loss=report.train_loss, bytes_up=traffic.per_client("bytes_up"),
                        bytes_down=traffic.per_client("bytes_down"), wall_seconds=report.wall_seconds)
            complete = not self.evaluated(server_round)
        elif kind == "GlobalEvalReport" or getattr(report, "scope", "tenant") == "global":
            collected.grid.take()  # split: the tenants' global-test traffic, not part of a round
            collected.global_evaluations.append(report)
            line.update(global_test_accuracy=report.accuracy)
        elif kind in ("EvalReport", "FedAvgEvalReport"):
            collected.evaluations.append((report, collected.grid.take()))
            line.update(test_accuracy=report.accuracy, test_macro_f1=report.macro_f1)
            complete = not self.global_due(server_round)
        if complete:
            self.emit(self.pending.pop(server_round, line))
        collected.finished = time.perf_counter()


def _tenant(costs: NodeCosts, node: int) -> str:
    return f"tenant-{costs.partition_id}" if costs.partition_id >= 0 else f"node-{node}"


def _sharing_row(report: Any) -> dict | None:
    return asdict(report) if is_dataclass(report) else None


def round_rows(collected: Collected, epochs: int) -> list[dict]:
    """results.json ``rounds``: accuracy, loss, bytes and time of every round (round 0: initial evaluation)."""
    evaluations = {report.server_round: report for report, _ in collected.evaluations}
    global_evals = {report.server_round: report for report in collected.global_evaluations}
    rounds = []
    for report, traffic in collected.rounds:
        r = report.server_round
        evaluation = evaluations.get(r)
        eval_traffic = next((t for e, t in collected.evaluations if e.server_round == r), Traffic())
        rounds.append({
            "round": r,
            "test_accuracy": evaluation.accuracy if evaluation else None,
            "per_tenant_accuracy": dict(evaluation.per_tenant) if evaluation else None,
            "test_macro_f1": evaluation.macro_f1 if evaluation else None,
            "per_tenant_macro_f1": dict(evaluation.per_tenant_f1) if evaluation else None,
            "global_test_accuracy": global_evals[r].accuracy if r in global_evals else None,
            "train_loss": report.train_loss,
            "bytes_up": traffic.per_client("bytes_up"),
            "bytes_down": traffic.per_client("bytes_down"),
            "eval_bytes_up": eval_traffic.per_client("bytes_up"),
            "eval_bytes_down": eval_traffic.per_client("bytes_down"),
            "round_trips": getattr(report, "round_trips", traffic.round_trips),  # split: its own count
            "round_trips_per_step": report.round_trips_per_step,
            "train_examples": report.num_examples * epochs,
            "client_cpu_seconds": sum(c.train_cpu_seconds for c in traffic.nodes.values()),
            "wall_seconds": report.wall_seconds,
            # split only: time the ServerApp spent in send_and_receive, in the cloud party and
            # (secure) in the dealer, which runs in the ServerApp process in simulation
            "flower_wait_seconds": getattr(report, "flower_wait_seconds", None),
            "cloud_seconds": getattr(report, "cloud_seconds", None),
            "dealer_seconds": getattr(report, "dealer_seconds", None),
            # split with target-loss: tenant -> the round its own loss reached the target
            "stopped": dict(getattr(report, "stopped", {}) or {}),
            "label_dp_epsilon": dict(getattr(report, "label_dp_epsilon", {}) or {}),
            # split with share: the round's SecAgg+ phase (tenants, dropped, round trips, bytes to and
            # from all tenants together, threshold, seconds); its traffic is in bytes_up/down too
            "sharing": _sharing_row(getattr(report, "sharing", None)),
        })
    initial = evaluations.get(0)
    initial_global = global_evals.get(0)
    if initial is not None or initial_global is not None:
        rounds.insert(0, {"round": 0, "test_accuracy": initial.accuracy if initial else None,
                          "per_tenant_accuracy": dict(initial.per_tenant) if initial else None,
                          "test_macro_f1": initial.macro_f1 if initial else None,
                          "per_tenant_macro_f1": dict(initial.per_tenant_f1) if initial else None,
                          "global_test_accuracy": initial_global.accuracy if initial_global else None,
                          "train_loss": None, "bytes_up": 0, "bytes_down": 0})
    return rounds


def client_rows(collected: Collected) -> list[dict]:
    """results.json ``clients``: each tenant's CPU, memory and bytes over the whole run (a resumed
    run's tenants had other node ids before: their costs are summed by tenant)."""
    total = collected.grid.total if collected.grid else Traffic()
    by_tenant: dict[str, tuple[int, NodeCosts]] = {}
    for node, costs in total.nodes.items():
        tenant = _tenant(costs, node)
        merged = by_tenant.setdefault(tenant, (node, NodeCosts()))[1]
        merged.add(costs)
    return sorted(({
        "tenant": tenant,
        "node_id": node,
        "train_cpu_seconds": costs.train_cpu_seconds,
        "eval_cpu_seconds": costs.eval_cpu_seconds,
        "finetune_cpu_seconds": costs.finetune_cpu_seconds,
        "setup_cpu_seconds": costs.setup_cpu_seconds,
        "peak_rss_bytes": costs.peak_rss_bytes,
        "rss_above_baseline_bytes": costs.rss_above_baseline_bytes,
        "torch_threads": costs.torch_threads,
        "bytes_up": costs.bytes_up,
        "bytes_down": costs.bytes_down,
        "messages": costs.messages,
    } for tenant, (node, costs) in by_tenant.items()), key=lambda c: c["tenant"])


def run_entry(name: str, strategy: str, config: RunConfig, settings: FlowerSettings, fedavg: Any,
              num_clients: int, collected: Collected, total_wall: float) -> dict:
    """One results.json run: the fields of ``flower-split train`` plus the federated details."""
    final_eval = collected.evaluations[-1][0] if collected.evaluations else None
    final_global = collected.global_evaluations[-1] if collected.global_evaluations else None
    rounds = round_rows(collected, fedavg.local_epochs if fedavg is not None else 1)
    clients = client_rows(collected)
    train_rounds = [r for r in rounds if r["round"] > 0]
    train_examples = sum(r["train_examples"] for r in train_rounds)
    train_cpu = sum(c["train_cpu_seconds"] for c in clients)
    return {
        "name": name,
        "mode": "federated",
        "strategy": strategy,
        "security": config.security if strategy == "split" else "none",
        "dataset": config.dataset,
        "model": config.model,
        "test_accuracy": final_eval.accuracy if final_eval else None,
        "test_macro_f1": final_eval.macro_f1 if final_eval else None,
        "global_test_accuracy": final_global.accuracy if final_global else None,
        "global_test_macro_f1": final_global.macro_f1 if final_global else None,
        "per_tenant_accuracy": dict(final_eval.per_tenant) if final_eval else {},
        "per_tenant_macro_f1": dict(final_eval.per_tenant_f1) if final_eval else {},
        "per_tenant_test_examples": dict(final_eval.num_examples) if final_eval else {},
        "train_loss_history": [r["train_loss"] for r in train_rounds],
        "wall_seconds": collected.finished - collected.started,
        "startup_seconds": collected.startup_seconds,
        "simulation_wall_seconds": total_wall,
        "client_cpu_seconds": train_cpu + sum(c["eval_cpu_seconds"] for c in clients),
        "client_train_cpu_seconds": train_cpu,
        "client_cpu_seconds_per_tenant": train_cpu / num_clients,
        "per_tenant_client_cpu_seconds": {c["tenant"]: c["train_cpu_seconds"] for c in clients},
        "train_examples_processed": train_examples,
        "client_cpu_seconds_per_sample": train_cpu / train_examples if train_examples else None,
        "client_peak_rss_bytes": max((c["peak_rss_bytes"] for c in clients), default=0),
        "client_rss_above_baseline_bytes": max((c["rss_above_baseline_bytes"] for c in clients), default=0),
        "server_peak_rss_bytes": collected.server_peak_rss_bytes,
        "bytes_client_to_cloud": sum(c["bytes_up"] for c in clients),
        "bytes_cloud_to_client": sum(c["bytes_down"] for c in clients),
        "bytes_per_client_per_round": _mean([r["bytes_up"] + r["bytes_down"] for r in train_rounds]),
        "round_trips_per_step": _mean([r["round_trips_per_step"] for r in train_rounds]),
        "flower_wait_fraction": _wait_fraction(train_rounds),
        "num_clients": num_clients,
        "partition": settings.partition,
        "num_server_rounds": settings.num_server_rounds,
        "rounds_run": len(train_rounds),
        # FedAvg family: the plateau rule ended the run before its maximum number of rounds
        "plateau_stopped": bool(fedavg is not None and fedavg.plateau_patience
                                and len(train_rounds) < settings.num_server_rounds),
        "rounds": rounds,
        "personalized": personalized_entry(collected, clients, train_cpu, train_examples, num_clients),
        "tenants_stopped": rounds[-1].get("stopped", {}) if rounds else {},
        **_privacy(config, rounds),
        "clients": clients,
        "config": config.to_dict(),
        "flower": {**settings.__dict__, **(dict(fedavg.__dict__) if fedavg else {})},
    }


def personalized_entry(collected: Collected, clients: list[dict], train_cpu: float, train_examples: int,
                       num_clients: int) -> dict | None:
    """The personalised row of a FedAvg-family run (fine-tuning after the rounds), or None.

    Its costs are the federated rounds' plus the fine-tuning's: client CPU per tenant and per
    training sample count both (what a tenant spent to get the personalised model).
    """
    if collected.personalized is None:
        return None
    report, _ = collected.personalized
    tune_cpu = sum(c["finetune_cpu_seconds"] for c in clients)
    tune_examples = sum(report.train_examples.values())
    samples = train_examples + tune_examples
    return {
        "epochs": report.epochs,
        "test_accuracy": report.accuracy,
        "test_macro_f1": report.macro_f1,
        "per_tenant_accuracy": dict(report.per_tenant),
        "per_tenant_macro_f1": dict(report.per_tenant_f1),
        "per_tenant_test_examples": dict(report.num_examples),
        "failures": dict(report.failures),
        "wall_seconds": report.wall_seconds,
        "finetune_examples": tune_examples,
        "client_finetune_cpu_seconds": tune_cpu,
        "client_train_cpu_seconds": train_cpu + tune_cpu,
        "client_cpu_seconds_per_tenant": (train_cpu + tune_cpu) / num_clients,
        "per_tenant_client_cpu_seconds": {c["tenant"]: c["train_cpu_seconds"] + c["finetune_cpu_seconds"]
                                          for c in clients},
        "train_examples_processed": samples,
        "client_cpu_seconds_per_sample": (train_cpu + tune_cpu) / samples if samples else None,
    }


def _privacy(config: RunConfig, rounds: list[dict]) -> dict[str, Any]:
    """The privacy settings of a federated run: label-DP (every tenant's epsilon after its last
    round, and the worst; None when off: no guarantee), randomized response, input noise."""
    per_tenant: dict[str, float] = {}
    for row in rounds:
        per_tenant.update(row.get("label_dp_epsilon", {}))
    rr = {"label_rr_epsilon": config.label_rr_epsilon or None,  # randomized response: pure, fixed epsilon
          "input_noise": config.input_noise or None}  # its per-token mu: D / sigma (docs/PRIVACY.md)
    if not config.label_dp_noise:
        return {"label_dp_epsilon": None, **rr}
    return {"label_dp_noise": config.label_dp_noise, "label_dp_delta": config.label_dp_delta,
            "label_dp_epsilon": max(per_tenant.values(), default=None), "per_tenant_label_dp_epsilon": per_tenant,
            **rr}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _wait_fraction(rounds: list[dict]) -> float | None:
    """Share of the training rounds' wall time spent waiting on Flower (None if not measured)."""
    waits = [r.get("flower_wait_seconds") for r in rounds]
    wall = sum(r["wall_seconds"] or 0.0 for r in rounds)
    if not rounds or any(w is None for w in waits) or wall <= 0:
        return None
    return sum(waits) / wall
