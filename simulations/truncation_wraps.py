"""How often a secure tenant's local truncations fail, and where (docs/mpc.md, issue 18).

    python simulations/truncation_wraps.py --config simulations/configs/banking77-10tenants-share.toml \
        --tenant 3 --rounds 1 --out runs/truncation-wraps.json

Runs one tenant's secure training rounds (the config's ``[run]`` and ``[split]`` settings, no
sharing, its partition of the config's federation) through the real ServerApp strategy and
ClientApp on the in-process grid, dealer co-located. At every local truncation
(``AdditiveShare.truncate``) it adds the two parties' shares back together, which this script
can do and no party can, and counts per site (the truncated tensor's shape and fractional bits):
the elements truncated, the expected failures (the sum over elements of |x| / 2^64, x the signed
ring value: a failure is a wrap of the shares, and x_0 is uniform) and the failures that happened
(the signed sum of the shares overflowed). A cloud truncation is paired with the client's by
order: with one tenant both parties run the same programs in the same order (a pair whose shapes
differ is counted as ``unpaired``). The timers and the code they count are unchanged.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from flwr.supercore.task_identity import TaskIdentity

from flower_split.apps.client_app import make_client_app
from flower_split.apps.server_app import run_cloud
from flower_split.flower.local_grid import LocalGrid
from flower_split.flower.strategy_utils import EvalReport, RoundReport
from flower_split.runs.compare import federated_values
from flower_split.runs.compare_spec import load_spec

share_module = importlib.import_module("flower_split.mpc.share")  # the package exports a function `share`


class WrapCounter:
    """Pairs the two parties' truncations of the same value and counts what a wrap would do."""

    def __init__(self) -> None:
        self.queues: dict[int, collections.deque] = {0: collections.deque(), 1: collections.deque()}
        self.sites: dict[str, dict[str, float]] = collections.defaultdict(
            lambda: {"elements": 0, "expected": 0.0, "happened": 0, "max_abs": 0.0})
        self.unpaired = 0

    def see(self, share: Any, bits: int) -> None:
        mine = (share.data.clone(), share.frac_bits, bits)
        other = self.queues[1 - share.party]
        if not other:
            self.queues[share.party].append(mine)
            return
        theirs = other.popleft()
        if theirs[0].shape != mine[0].shape or theirs[1:] != mine[1:]:
            self.unpaired += 1
            return
        x0, x1 = theirs[0], mine[0]
        total = x0 + x1  # int64: wraps modulo 2^64, as the ring does
        wrapped = ((x0 >= 0) == (x1 >= 0)) & ((total >= 0) != (x0 >= 0))
        size = total.double().abs()
        site = self.sites[f"{tuple(total.shape)} at {mine[1]} bits"]
        site["elements"] += total.numel()
        site["expected"] += float((size / 2.0**64).sum())
        site["happened"] += int(wrapped.sum())
        site["max_abs"] = max(site["max_abs"], float(size.max()) / 2.0 ** mine[1])

    def totals(self) -> dict[str, float]:
        return {"elements": sum(s["elements"] for s in self.sites.values()),
                "expected": sum(s["expected"] for s in self.sites.values()),
                "happened": sum(s["happened"] for s in self.sites.values()), "unpaired": self.unpaired}


def _values(config: str, rounds: int) -> tuple[dict[str, Any], int]:
    spec = load_spec(config)
    kind = next((k for k in spec.runs if k.startswith("split-secure")), "split-secure-client")
    values = {k: v for k, v in federated_values(spec, kind).items() if not k.startswith("share")}
    values.update({"num-server-rounds": rounds, "min-nodes": 1, "device": "cpu", "global-eval": False,
                   "security": "secure", "insecure-colocated-dealer": True, "reply-timeout": 3600.0})
    return values, spec.num_clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/configs/banking77-10tenants-share.toml")
    parser.add_argument("--tenant", type=int, default=3, help="partition id of the tenant to run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="sites to print, by expected failures")
    parser.add_argument("--out", default=None, help="JSON file for the per-round counts")
    args = parser.parse_args()
    values, partitions = _values(args.config, args.rounds)
    counter = WrapCounter()
    truncate = share_module.AdditiveShare.truncate

    def counted(self: Any, bits: int) -> Any:
        if bits:
            counter.see(self, bits)
        return truncate(self, bits)

    share_module.AdditiveShare.truncate = counted
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0  # Message() outside a runtime
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def on_report(report: Any) -> None:
        if isinstance(report, RoundReport):
            rows.append({"round": report.server_round, "dropped": report.dropped, **counter.totals()})
        elif isinstance(report, EvalReport) and rows:
            rows[-1]["accuracy"] = report.accuracy

    node = {"partition-id": args.tenant, "num-partitions": partitions, "allow-unpinned-dealer": True}
    run_cloud(LocalGrid(make_client_app(values), {1: node}), values, on_report)
    sites = sorted(counter.sites.items(), key=lambda kv: -kv[1]["expected"])
    print(f"tenant {args.tenant}, {args.rounds} round(s), {time.perf_counter() - started:.0f} s; cumulative per round:")
    for row in rows:
        print(f"  round {row['round']}: {row['elements']:.3g} elements truncated, {row['expected']:.4f} failures "
              f"expected, {row['happened']} happened, accuracy {row.get('accuracy', float('nan')):.4f}")
    print(f"sites by expected failures (of {len(sites)}):")
    for name, site in sites[:args.top]:
        print(f"  {name:28s} {site['elements']:12.3g} elements  {site['expected']:.2e} expected  "
              f"{site['happened']} happened  max |v| {site['max_abs']:.3g}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": "python simulations/truncation_wraps.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "run_config": values,
            "rounds": rows, "sites": dict(sites)}, indent=1))


if __name__ == "__main__":
    main()
