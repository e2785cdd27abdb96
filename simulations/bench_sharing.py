"""Cost of opt-in cross-tenant sharing under Flower's SecAgg+ (issue 18): round trips and bytes per round.

    python simulations/bench_sharing.py --tenants 3 5 --rounds 2

Runs the real ServerApp strategy and ClientApps on the in-process grid (flower.local_grid: no
network, compute only), the quick config's tiny model (head rank 8, tail bottleneck 16,
banking77), one line per (security, share, tenants): the sharing phase's round trips, bytes
to and from the tenants per round (Flower record payloads), shared values and the tenants'
mean test accuracy after the last round.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from flwr.supercore.task_identity import TaskIdentity

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.local_grid import LocalGrid
from flower_split.flower.strategy_utils import EvalReport, RoundReport

BASE = {"model": "tiny", "device": "cpu", "dataset": "banking77", "partition": "dirichlet:0.5",
        "max-train-samples": 600, "max-test-samples": 300, "head-rank": 8, "tail-bottleneck": 16,
        "lr-head": 0.02, "lr-tail": 0.3, "batch-size": 32, "local-steps": 8, "micro-batches": 4,
        "global-eval": False, "eval-every": 0, "reply-timeout": 600.0, "seed": 0}


def run(security: str, share: str, tenants: int, rounds: int) -> dict[str, Any]:
    config = {**BASE, "security": security, "share": share, "min-nodes": tenants, "num-server-rounds": rounds}
    if security == "secure":
        config.update({"label-protection": "client", "insecure-colocated-dealer": True, "batch-size": 16,
                       "max-length": 32, "local-steps": 4})
    nodes = {n: {"partition-id": n - 1, "num-partitions": tenants, "allow-unpinned-sharing": True,
                 "share-min-tenants": min(tenants, 4),  # a cost benchmark: 3 tenants share too
                 **({"allow-unpinned-dealer": True} if security == "secure" else {})} for n in range(1, tenants + 1)}
    reports: list = []
    started = time.perf_counter()
    run_cloud(LocalGrid(make_client_app(config), nodes), config, reports.append)
    shares = [r.sharing for r in reports if isinstance(r, RoundReport) and r.sharing is not None]
    final = [r for r in reports if isinstance(r, EvalReport)][-1]
    return {"security": security, "share": share, "tenants": tenants,
            "round_trips": shares[0].round_trips if shares else 0,
            "kib_to": sum(s.bytes_to_tenants for s in shares) / len(shares) / 1024 if shares else 0.0,
            "kib_from": sum(s.bytes_from_tenants for s in shares) / len(shares) / 1024 if shares else 0.0,
            "share_s": sum(s.seconds for s in shares) / len(shares) if shares else 0.0,
            "threshold": shares[0].threshold if shares else 0, "accuracy": final.accuracy,
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--security", nargs="+", default=["plain", "secure"])
    args = parser.parse_args()
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0  # Message() outside a runtime
    print("| security | share | tenants | round trips | KiB to tenants / round | KiB from tenants / round | "
          "threshold | sharing s / round | accuracy | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for security in args.security:
        for tenants in args.tenants:
            for share in ("none", "tail", "head-tail"):
                r = run(security, share, tenants, args.rounds)
                print(f"| {r['security']} | {r['share']} | {r['tenants']} | {r['round_trips']} | {r['kib_to']:.1f} | "
                      f"{r['kib_from']:.1f} | {r['threshold']} | {r['share_s']:.2f} | {r['accuracy']:.3f} | "
                      f"{r['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
