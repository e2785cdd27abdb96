"""Seconds per protocol round trip in a real deployment, with and without tenant workers.

A SuperLink (TLS, SuperNode authentication) and SuperNodes on localhost, as docs/deployment.md
sets them up (the harness of tests/deploy), then ``flwr run`` of the same quick runs twice:
every node relaying to a long-lived ``flower-split worker`` (node config ``worker-socket``)
and every node running the handlers in Flower's per-message ClientApp process. Runs:
split-plain (two tenants, two rounds of two steps in one message each) and split-secure with
client label protection (two tenants and the dealer node, two rounds of ``--secure-steps``
steps); the first round of a run with the channel includes its bootstrap over Flower.
Reads round trips and wall seconds from each run's results.json; prints a Markdown table.

    python simulations/bench_deploy.py [--secure-steps 1] [--variants channel,workers,none]

Numbers are the machine's: say which and how loaded when you quote them (docs/deployment.md §10).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deploy"))

from deploy_harness import LABELS, LocalFederation, missing_binaries, tenant_csv  # noqa: E402

RUN = {"model": "tiny", "head-rank": 8, "tail-bottleneck": 16, "lr-head": 0.02, "lr-tail": 0.3, "batch-size": 16,
       "num-server-rounds": 2, "eval-every": 0, "global-eval": False, "min-nodes": 2, "labels": ",".join(LABELS)}
PLAIN = {**RUN, "local-steps": 2, "micro-batches": 2}
TIMEOUT = 3600.0




def start_nodes(fed: LocalFederation, workers: bool) -> Path:
    """Two tenants and the dealer node, registered; the dealer's public key file."""
    from flower_split.protocol.dealer_identity import new_identity, save_identity

    private, public = save_identity(new_identity(), fed.dir / "dealer")
    keys = fed.node_keys("tenant-0", "tenant-1", "dealer")
    configs = {f"tenant-{t}": f'partition-id={t} data-path="{tenant_csv(fed.dir, t)}" dealer-public-key="{public}"'
               for t in (0, 1)}
    configs["dealer"] = f'role="dealer" dealer-key="{private}"'
    for name, node_config in configs.items():
        fed.register(keys[name][1])
        if workers:
            _, path = fed.start_worker(name)
            node_config += f' worker-socket="{path}"'
        fed.start_supernode(name, keys[name][0], node_config)
    return public


def measure(workers: bool, secure_steps: int, channel: bool = False) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fs-bench-") as tmp:
        fed = LocalFederation(Path(tmp))
        try:
            fed.start_superlink()
            dealer_pub = start_nodes(fed, workers)
            runs = {"split-plain": PLAIN,
                    "split-secure-client": {**RUN, "security": "secure", "label-protection": "client",
                                            "local-steps": secure_steps, "micro-batches": 1,
                                            "expected-dealer-key": str(dealer_pub)}}
            for name, config in runs.items():
                if channel:
                    config = {**config, "channel-address": "127.0.0.1:0"}
                out = fed.dir / f"results-{name}"
                started = time.monotonic()
                done = fed.run({**config, "results-dir": str(out)}, timeout=TIMEOUT)
                if done.returncode != 0:
                    raise RuntimeError(f"{name}: flwr run failed:\n{(done.stdout + done.stderr)[-3000:]}")
                run = json.loads((out / "results.json").read_text())["runs"][0]
                for number, round_ in enumerate(run["rounds"], 1):
                    rows.append({"run": name, "round": number, "workers": workers, "channel": channel,
                                 "round_trips": round_["round_trips"], "round_seconds": round_["wall_seconds"],
                                 "flwr_run_seconds": time.monotonic() - started,
                                 "client_cpu_seconds": run.get("client_cpu_seconds_per_tenant"),
                                 "accuracy": run.get("per_tenant_accuracy")})
        finally:
            fed.stop()
    return rows


def measure_simulation(secure_steps: int) -> list[dict]:
    """The same two runs in Flower's Ray simulation (``flower-split simulate``; the dealer a
    simulated node of its own), each tenant on 32 training rows of Banking77 as the
    deployment's tenants on their 40-row files (80 % train): the latency floor to compare with."""
    from flower_split.runs.simulate import simulate

    rows = []
    sim = {k: v for k, v in RUN.items() if k != "labels"}  # the dataset's own label set
    runs = {"split-plain": {**sim, **{k: PLAIN[k] for k in ("local-steps", "micro-batches")}},
            "split-secure-client": {**sim, "security": "secure", "label-protection": "client",
                                    "local-steps": secure_steps, "micro-batches": 1}}
    for name, config in runs.items():
        started = time.monotonic()
        run = simulate("split", {**config, "partition": "iid", "max-train-samples": 64, "max-test-samples": 16},
                       2, progress=False, cpus=2)
        for number, round_ in enumerate(run["rounds"], 1):
            rows.append({"run": name, "round": number, "workers": False, "channel": False, "runtime": "simulation",
                         "round_trips": round_["round_trips"], "round_seconds": round_["wall_seconds"],
                         "flwr_run_seconds": time.monotonic() - started,
                         "client_cpu_seconds": run.get("client_cpu_seconds_per_tenant"),
                         "accuracy": run.get("per_tenant_accuracy")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secure-steps", type=int, default=1)
    parser.add_argument("--variants", default="channel,workers,none",
                        help="comma-separated: channel (workers and the direct channel), workers (workers, "
                             "messages through Flower), none (handlers in Flower's per-message process), "
                             "simulation (the same runs in Flower's Ray simulation)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if missing_binaries():
        print(f"Flower binaries missing: {missing_binaries()}", file=sys.stderr)
        return 2
    rows = []
    for variant in args.variants.split(","):
        if variant not in ("channel", "workers", "none", "simulation"):
            parser.error(f"--variants: unknown variant {variant!r}")
        if variant == "simulation":
            rows += measure_simulation(args.secure_steps)
        else:
            rows += measure(variant != "none", args.secure_steps, channel=variant == "channel")
    print(f"\nmachine: {platform.node()} {platform.machine()}, python {platform.python_version()}\n")
    print("| run | runtime | tenant workers | direct channel | round | round trips | round | per round trip "
          "| run end to end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row.get('runtime', 'deployment')} | {'yes' if row['workers'] else 'no'} | "
              f"{'yes' if row['channel'] else 'no'} | "
              f"{row['round']} | {row['round_trips']} | "
              f"{row['round_seconds']:.1f} s | {row['round_seconds'] / row['round_trips']:.2f} s | "
              f"{row['flwr_run_seconds']:.0f} s |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
