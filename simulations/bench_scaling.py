"""Cloud throughput against the number of tenants, secure vs plain, and the body-only floor (issue 15).

    python simulations/bench_scaling.py --tenants 1 5 10 20 --steps 2 --out runs/scaling

For each security level and tenant count it runs one training round of ``--steps`` steps per
tenant through the real ServerApp strategy and ClientApps on the in-process grid
(flower.local_grid: every party in this process, no network), and reads the round's report: the
seconds spent in the cloud party (``cloud_seconds``; secure: without the dealer, which is
co-located here and reported apart) and in the whole round. Cloud throughput is training samples
per cloud second. The floor is the frozen body's forward with a graph and backward on the same
batch shape, per sample: what any cloud must spend (split-plain without kept graphs runs one
forward more). Writes ``scaling.json`` and ``scaling.png`` under ``--out``.

All parties share one process and the machine's cores, so the round's wall time includes the
clients' work; the cloud's seconds are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from flwr.supercore.task_identity import TaskIdentity

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.local_grid import LocalGrid
from flower_split.flower.strategy_utils import RoundReport
from flower_split.model import hidden_size, load_encoder, split_encoder
from flower_split.protocol.body_runner import BodyRunner

SHAPES = {"tiny": dict(head_rank=8, tail_bottleneck=16), "minilm": dict(head_rank=64, tail_bottleneck=256)}


def run_round(model: str, security: str, tenants: int, steps: int, batch: int, max_length: int) -> dict[str, Any]:
    """One training round of ``tenants`` tenants, ``steps`` steps each; the round's costs."""
    shapes = SHAPES[model]
    config = {"model": model, "device": "cpu", "dataset": "banking77", "partition": "iid", "seed": 0,
              "head-rank": shapes["head_rank"], "tail-bottleneck": shapes["tail_bottleneck"], "tail-input": "pooled",
              "batch-size": batch, "max-length": max_length, "local-steps": steps, "micro-batches": steps,
              "max-train-samples": tenants * batch * steps * 2, "max-test-samples": tenants * 4,
              "num-server-rounds": 1, "min-nodes": tenants, "global-eval": False, "eval-every": 0,
              "reply-timeout": 3600.0, "security": security}
    if security == "secure":
        config.update({"label-protection": "client", "insecure-colocated-dealer": True})
    nodes = {n: {"partition-id": n - 1, "num-partitions": tenants,
                 **({"allow-unpinned-dealer": True} if security == "secure" else {})} for n in range(1, tenants + 1)}
    reports: list = []
    started = time.perf_counter()
    run_cloud(LocalGrid(make_client_app(config), nodes), config, reports.append)
    (report,) = [r for r in reports if isinstance(r, RoundReport)]
    return {"security": security, "tenants": tenants, "samples": report.num_examples,
            "cloud_seconds": report.cloud_seconds, "dealer_seconds": report.dealer_seconds,
            "round_seconds": report.wall_seconds, "round_trips": report.round_trips,
            "run_seconds": time.perf_counter() - started,
            "cloud_samples_per_second": report.num_examples / report.cloud_seconds if report.cloud_seconds else None}


def body_floor(model: str, batch: int, tokens: int, reps: int) -> float:
    """Seconds per sample of the frozen body's forward (with a graph) and backward on [batch, tokens]."""
    encoder = load_encoder(model, seed=0)
    dim = hidden_size(encoder)
    _, body = split_encoder(encoder)
    runner = BodyRunner(body, "cpu")
    f = torch.randn(batch, tokens, dim)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        h, graph = runner.forward(f, mask, graph=True)
        runner.backward(graph, torch.randn_like(h))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) / batch


def plot(rows: list[dict[str, Any]], floor: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for security, style in (("plain", "o-"), ("secure", "s-")):
        points = [(r["tenants"], r["cloud_samples_per_second"]) for r in rows if r["security"] == security]
        if points:
            ax.plot(*zip(*points), style, label=f"split-{security}: cloud samples / s")
    ax.axhline(1.0 / floor, color="gray", linestyle="--", label="floor: body forward + backward alone")
    ax.set_xlabel("tenants (one round, steps per tenant fixed)")
    ax.set_ylabel("training samples per cloud second")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", choices=sorted(SHAPES))
    parser.add_argument("--tenants", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--steps", type=int, default=2, help="training steps per tenant in the round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--security", nargs="+", default=["plain", "secure"], choices=["plain", "secure"])
    parser.add_argument("--floor-tokens", type=int, default=44, help="tokens per row for the floor (Banking77's "
                        "first MiniLM batch pads to 44)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args()
    if min(args.tenants) < 1 or args.steps < 1:
        parser.error("--tenants and --steps must be positive")
    torch.set_num_threads(args.threads)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0  # Message() outside a runtime
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{args.threads} torch thread(s)")
    print(f"# {machine}")
    floor = body_floor(args.model, args.batch, args.floor_tokens, reps=3)
    print(f"# floor: {1e3 * floor:.2f} ms per sample ({1 / floor:.1f} samples/s): body forward + backward, "
          f"[{args.batch}, {args.floor_tokens}]")
    print("| security | tenants | samples | cloud s | samples / cloud s | x floor | dealer s | round s | round trips |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for security in args.security:
        for tenants in args.tenants:
            row = run_round(args.model, security, tenants, args.steps, args.batch, args.max_length)
            rows.append(row)
            rate = row["cloud_samples_per_second"]
            print(f"| {security} | {tenants} | {row['samples']} | {row['cloud_seconds']:.1f} | {rate:.1f} | "
                  f"{floor * rate:.2f} | {row['dealer_seconds']:.1f} | {row['round_seconds']:.1f} | "
                  f"{row['round_trips']} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                                       "floor_seconds_per_sample": floor, "rows": rows}, indent=1))
    plot(rows, floor, args.out / "scaling.png",
         f"{args.model}, batch {args.batch}, {args.steps} steps per tenant, in process\n{machine}")
    print(f"# wrote {args.out / 'scaling.json'} and {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
