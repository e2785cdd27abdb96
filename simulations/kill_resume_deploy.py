"""kill -9 of a tenant, of the dealer and of the ServerApp mid-round, with real processes.

One federation as docs/deployment.md sets it up (the harness of tests/deploy: SuperLink with
TLS and SuperNode authentication, ``flwr run``): two tenants and the dealer node, each a
SuperNode with its own ``flower-split worker`` and node config ``state-dir``; the runs are
secure with client label protection, run config ``state-dir``, ``session`` and the direct
channel. Three runs in sequence, one session each:

- ``tenant``: SIGKILL of tenant-1's SuperNode and worker process groups in round 2 (aimed
  at its mirror's generation: a few messages after the cloud checkpointed round 1); a new worker
  at once, the SuperNode restarted with the same key and node config once the SuperLink
  has seen it go;
- ``dealer``: the same for the dealer node;
- ``cloud``: SIGKILL of the run's ``flwr-serverapp`` process (a child of the SuperLink's
  SuperExec; nothing else), then the same ``flwr run`` again (same ``session``).

Before each kill and after the run, every party's mirrored state is read (tenants and the
dealer under their node ``state-dir``, the cloud under the run's ``state-dir``): SHA-256 of
its files, its step counters. Every log is scanned for refusals and errors. Prints a
Markdown table and writes the rows as JSON.

    python simulations/kill_resume_deploy.py [--scenarios tenant,dealer,cloud] [--out rows.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deploy"))

from deploy_harness import LABELS, LocalFederation, missing_binaries, tenant_csv  # noqa: E402

ROUNDS, STEPS = 3, 4
RUN = {"model": "tiny", "head-rank": 8, "tail-bottleneck": 16, "lr-head": 0.02, "lr-tail": 0.3, "batch-size": 16,
       "num-server-rounds": ROUNDS, "local-steps": STEPS, "micro-batches": 1, "eval-every": 0,
       "global-eval": False, "min-nodes": 2, "labels": ",".join(LABELS), "security": "secure",
       "label-protection": "client", "channel-address": "127.0.0.1:0"}
TIMEOUT = 1800.0
# what a refused or failed message looks like in the logs (the ServerApp's and every worker's)
TROUBLE = re.compile(r"refus|replay|StateError|ProtocolError|Traceback|below next.step|dropping|lost", re.I)




class Nodes:
    """The three SuperNodes and their workers; restartable by name."""

    def __init__(self, fed: LocalFederation) -> None:
        from flower_split.protocol.dealer_identity import new_identity, save_identity

        self.fed = fed
        private, self.dealer_pub = save_identity(new_identity(), fed.dir / "dealer")
        self.keys = fed.node_keys("tenant-0", "tenant-1", "dealer")
        state = fed.dir / "node-state"
        self.configs = {f"tenant-{t}": f'partition-id={t} data-path="{tenant_csv(fed.dir, t)}" '
                                       f'dealer-public-key="{self.dealer_pub}" state-dir="{state / f"tenant-{t}"}"'
                        for t in (0, 1)}
        self.configs["dealer"] = f'role="dealer" dealer-key="{private}" state-dir="{state / "dealer"}"'
        self.procs: dict[str, tuple] = {}  # name -> (supernode, worker)
        self.restarts = 0
        for name in self.configs:
            fed.register(self.keys[name][1])
            self.start(name)

    def start(self, name: str, worker=None, socket: str | None = None) -> None:
        tag = f"{name}-r{self.restarts}" if self.restarts else name
        if worker is None:
            worker, socket = self.fed.start_worker(tag)
        node = self.fed.start_supernode(tag, self.keys[name][0], f'{self.configs[name]} worker-socket="{socket}"')
        self.procs[name] = (node, worker)

    def kill_and_restart(self, name: str, online_total: int) -> float:
        """SIGKILL both groups; a new worker at once; the SuperNode once the SuperLink saw it go.
        Seconds from the kill to the restarted SuperNode's start."""
        killed = time.monotonic()
        for process in self.procs[name]:
            self.fed.kill(process)
        self.restarts += 1
        worker, socket = self.fed.start_worker(f"{name}-r{self.restarts}")
        wait_online(self.fed, online_total - 1)
        self.start(name, worker, socket)
        return time.monotonic() - killed


def wait_online(fed: LocalFederation, count: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while (online := fed.online_nodes()) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{online} SuperNodes online, not {count}")
        time.sleep(2.0)


# -- the parties' saved state ---------------------------------------------------------------------

def party_dirs(fed: LocalFederation, session: str) -> dict[str, Path]:
    dirs = {t: fed.dir / "node-state" / t / session / "tenants" / t for t in ("tenant-0", "tenant-1")}
    dirs["dealer"] = fed.dir / "node-state" / "dealer" / session / "dealer"
    dirs["cloud"] = fed.dir / "cloud-state" / session / "cloud"
    return dirs


def _steps(tree: object, path: str = "") -> dict[str, int]:
    """Every integer in the tree under a key that names a step counter."""
    found: dict[str, int] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            sub = f"{path}/{key}" if path else str(key)
            if isinstance(value, int) and not isinstance(value, bool) and re.search(r"step|updates/", sub) \
                    and "steps_per" not in sub and "total_steps" not in sub and "local" not in sub:
                found[sub] = value
            else:
                found.update(_steps(value, sub))
    return found


def snapshot(fed: LocalFederation, session: str) -> dict[str, dict]:
    from flower_split.state import read_party

    out = {}
    for party, directory in party_dirs(fed, session).items():
        if not (directory / "party.json").exists():
            out[party] = {"missing": True}
            continue
        saved = read_party(directory, "cloud" if party == "cloud" else "node")
        tree = saved.state
        if party != "cloud":  # a node's Flower records: the party's own state_dict inside
            from flower_split.flower.node_state import records_from_tree
            from flower_split.flower.context_state import records_to_state

            records = records_from_tree(saved.state, saved.meta_file)
            kind = "dealer" if party == "dealer" else "secure"
            tree = records_to_state(records[f"{kind}.arrays"], records[f"{kind}.config"])
        files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(directory.iterdir())
                 if f.is_file() and not f.name.startswith(".")}
        out[party] = {"files": files, "meta": {k: v for k, v in saved.meta.items() if k != "body_sha256"},
                      "steps": {k: v for k, v in _steps(tree).items()
                                                                if "spec/" not in k and "ctx/" not in k}}
    return out


def cloud_round(fed: LocalFederation, session: str) -> int:
    meta = party_dirs(fed, session)["cloud"] / "party.json"
    try:
        return int(json.loads(meta.read_text())["meta"]["completed_round"])
    except (OSError, ValueError, KeyError):
        return -1


def generation(fed: LocalFederation, session: str, party: str) -> int:
    """The mirror generation of a node: one more for every message it handled in full (over
    Flower or the direct channel alike; the worker logs only the former)."""
    meta = party_dirs(fed, session)[party] / "party.json"
    try:
        return int(json.loads(meta.read_text())["meta"]["generation"])
    except (OSError, ValueError, KeyError):
        return 0


def serverapp_pids(superlink_pid: int) -> list[int]:
    """``flwr-serverapp`` processes descended from the SuperLink (its SuperExec's children)."""
    parents, cmdlines = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parents[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdlines[pid] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == superlink_pid:
                return True
        return False

    return [pid for pid, cmd in cmdlines.items() if "flwr-serverapp" in cmd and descends(pid)]


# -- one scenario ---------------------------------------------------------------------------------

def scenario(fed: LocalFederation, nodes: Nodes, name: str) -> dict:
    victim = {"tenant": "tenant-1"}.get(name, name)
    session = f"kill-{name}"
    results = fed.dir / f"results-{session}"
    config = {**RUN, "expected-dealer-key": str(nodes.dealer_pub), "session": session,
              "state-dir": str(fed.dir / "cloud-state"), "results-dir": str(results)}
    logs_before = {p.name: len(p.text()) for p in fed.processes}
    started = time.monotonic()
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(done=fed.run(config, timeout=TIMEOUT)), daemon=True)
    thread.start()
    # aim: round 1 checkpointed, then a few more messages on the watched worker (round 2, mid-step)
    watched = "tenant-0" if victim == "cloud" else victim
    while cloud_round(fed, session) < 1:
        if not thread.is_alive():
            raise RuntimeError(f"run ended before round 1: {outcome}")
        time.sleep(0.1)
    target = generation(fed, session, watched) + (2 if victim == "dealer" else 5)
    while generation(fed, session, watched) < target:
        time.sleep(0.05)
    before = snapshot(fed, session)
    kill_at = time.monotonic() - started
    runs = 1
    if victim == "cloud":
        pids = serverapp_pids(fed.processes[0].popen.pid)
        assert len(pids) == 1, f"flwr-serverapp processes of the SuperLink: {pids}"
        os.kill(pids[0], signal.SIGKILL)
        thread.join(TIMEOUT)
        first = outcome["done"]
        killed_log = first.stdout + first.stderr
        restart_s = 0.0
        done = fed.run(config, timeout=TIMEOUT)  # the same command again: the same session resumes
        runs = 2
    else:
        restart_s = nodes.kill_and_restart(victim, 3)
        thread.join(TIMEOUT)
        done = outcome["done"]
        killed_log = ""
    wall = time.monotonic() - started
    log = killed_log + done.stdout + done.stderr
    after = snapshot(fed, session)
    run = json.loads((results / "results.json").read_text())["runs"][0] if (results / "results.json").exists() else {}
    worker_trouble = []
    for process in fed.processes:
        text = process.text()[logs_before.get(process.name, 0):]
        worker_trouble += [f"{process.name}: {line.strip()[:240]}" for line in text.splitlines()
                           if TROUBLE.search(line)]
    return {"scenario": name, "victim": victim, "session": session, "returncode": done.returncode, "flwr_runs": runs,
            "kill_at_s": round(kill_at, 1), "restart_s": round(restart_s, 1), "wall_s": round(wall, 1),
            "rounds": [{k: r.get(k) for k in ("round", "round_trips", "wall_seconds", "per_tenant_accuracy")}
                       for r in run.get("rounds", [])],
            "before": before, "after": after,
            "log_trouble": [line.strip()[:300] for line in log.splitlines() if TROUBLE.search(line)],
            "process_trouble": worker_trouble, "log_tail": log[-3000:]}


def reused(row: dict) -> list[str]:
    """Step counters that went backwards or stood still between the kill and the end (a party
    that numbered steps after the snapshot must end above it)."""
    bad = []
    for party, state in row["before"].items():
        now = row["after"].get(party, {})
        for key, value in state.get("steps", {}).items():
            if "next_step" in key and key in now.get("steps", {}) and now["steps"][key] <= value:
                bad.append(f"{party}:{key} {value} -> {now['steps'][key]}")
    return bad


def updates(state: dict) -> dict[str, int]:
    return {t: state.get("steps", {}).get(f"cloud/tenants/{t}/halves/updates/tail")
            for t in ("tenant-0", "tenant-1")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="tenant,dealer,cloud")
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep", default=None, help="a directory to run in (kept); default a temporary one")
    args = parser.parse_args()
    if missing_binaries():
        print(f"Flower binaries missing: {missing_binaries()}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the federation is stopped on the way out
    rows = []
    with tempfile.TemporaryDirectory(prefix="fs-kill-") as tmp:
        directory = Path(args.keep) if args.keep else Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        fed = LocalFederation(directory)
        try:
            fed.start_superlink()
            nodes = Nodes(fed)
            wait_online(fed, 3)
            for victim in args.scenarios.split(","):
                row = scenario(fed, nodes, victim)
                row["reused"] = reused(row)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}, indent=1, default=str),
                      flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
        finally:
            fed.stop()
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}\n")
    print("| scenario | rc | rounds completed | cloud tail updates per tenant (kill -> end) | step numbers reused "
          "| killed at | wall |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        done = row["after"].get("cloud", {}).get("meta", {}).get("completed_round")
        b, a = updates(row["before"].get("cloud", {})), updates(row["after"].get("cloud", {}))
        print(f"| {row['scenario']} | {row['returncode']} | {done} / {ROUNDS} | "
              f"{', '.join(f'{t}: {b[t]} -> {a[t]}' for t in a)} | {len(row['reused'])} | "
              f"{row['kill_at_s']} s | {row['wall_s']} s |")
    return 0 if all(r["returncode"] == 0 and not r["reused"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
