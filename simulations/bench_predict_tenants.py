"""Inference throughput of many tenants at once: the ``predict`` run over the real strategy and ClientApps.

For each security level and each tenant count N it trains N tenants for one round of
``--steps`` steps (the weights only need to exist) with every party saving its state (node
``state-dir``, ServerApp ``state-dir`` + ``session``), then restarts every party (new
contexts, a new run of the same session) and times one ``predict = true`` run in which every
tenant classifies ``--texts`` Banking77 test texts of its own. All tenants' batches travel in
the same round trips (plain: one body pass per stage for all of them). The grid is
:class:`flower_split.flower.local_grid.LocalGrid`: real strategy, real ClientApps, no network,
so times are the protocol's compute (add Flower's latency per round trip; the report gives
the round trips). ``texts_per_s`` counts the prediction pass only; ``run_s`` adds the
ServerApp's start (model load, resume, admission).

Usage: ``python simulations/bench_predict_tenants.py [--model minilm] [--tenants 1 10] [--texts 64]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from flwr.supercore.task_identity import TaskIdentity

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.data import load_dataset
from flower_split.flower.local_grid import LocalGrid
from flower_split.protocol.dealer_identity import new_identity, save_identity

LEVELS = {"plain": {"security": "plain"},
          "secure-client": {"security": "secure", "label-protection": "client"}}


def _grid(config: dict, tenants: int, root: Path, run_id: int, keys: tuple[Path, Path] | None) -> LocalGrid:
    nodes: dict[int, dict] = {}
    for node in range(1, tenants + 1):
        nodes[node] = {"partition-id": node - 1, "num-partitions": tenants, "state-dir": str(root / "nodes"),
                       "predict-input": str(root / f"tenant-{node - 1}.txt")}
        if keys:
            nodes[node]["dealer-public-key"] = str(keys[1])
    if keys:
        nodes[tenants + 1] = {"role": "dealer", "dealer-key": str(keys[0]), "state-dir": str(root / "nodes")}
    return LocalGrid(make_client_app(config), nodes, run_id)


def bench(level: str, tenants: int, args: argparse.Namespace, texts: list[str], out: Path) -> dict:
    root = out / f"{level}-{tenants}"
    root.mkdir(parents=True)
    for tenant in range(tenants):
        chunk = texts[tenant * args.texts:(tenant + 1) * args.texts]
        (root / f"tenant-{tenant}.txt").write_text("\n".join(chunk) + "\n", encoding="utf-8")
    config = {"model": args.model, "device": "cpu", "partition": "iid", "batch-size": args.batch,
              "max-train-samples": args.train_samples * tenants, "max-test-samples": 8 * tenants,
              "local-steps": args.steps, "micro-batches": args.steps, "num-server-rounds": 1, "eval-every": 0,
              "global-eval": False, "min-nodes": tenants, "state-dir": str(root / "cloud"), "session": "bench",
              **LEVELS[level]}
    keys = save_identity(new_identity(), root / "keys") if level != "plain" else None
    run_cloud(_grid(config, tenants, root, 1, keys), config)
    grid = _grid({**config, "predict": True}, tenants, root, 2, keys)
    started = time.perf_counter()
    report = run_cloud(grid, {**config, "predict": True}).evaluations[0]
    seconds = time.perf_counter() - started
    done = sum(report.num_examples.values())
    return {"level": level, "tenants": tenants, "texts": done, "predict_s": round(report.wall_seconds, 2),
            "texts_per_s": round(done / report.wall_seconds, 1), "run_s": round(seconds, 2),
            "round_trips": report.round_trips, "dropped": report.dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tenants", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--texts", type=int, default=64, help="texts per tenant")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1, help="training steps per tenant before predicting")
    parser.add_argument("--train-samples", type=int, default=64, help="training rows per tenant")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--out", default=None, help="where states and predictions go (default: a temp directory)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0  # outside a Flower runtime
    texts = load_dataset("banking77")[1].texts
    if len(texts) < max(args.tenants) * args.texts:
        raise SystemExit(f"--texts {args.texts} x {max(args.tenants)} tenants: only {len(texts)} test texts")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-predict-tenants-"))
    rows = [bench(level, n, args, texts, out) for level in args.levels for n in args.tenants]
    for row in rows:
        print(json.dumps(row))
    (out / "bench_predict_tenants.json").write_text(json.dumps(rows, indent=1))
    print(f"results: {out / 'bench_predict_tenants.json'}")


if __name__ == "__main__":
    main()
