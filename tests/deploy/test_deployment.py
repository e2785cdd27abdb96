"""A real deployment on localhost: ``flower-superlink``, ``flower-supernode`` and ``flwr run``.

What docs/deployment.md tells a person to do, done by a test: a CA and the SuperLink's TLS
certificate (``flower-split tls-certs``), SuperNode authentication (``flwr supernode
register`` of each tenant's public key, ``--enable-supernode-auth``), no runtime dependency
installation (``--disable-runtime-dependency-installation``), every tenant on its own CSV file
(node config ``data-path``), results.json from the ServerApp (run-config ``results-dir``).

- an unregistered SuperNode is refused by the SuperLink;
- every node hands its messages to its own tenant worker (``flower-split worker``, node
  config ``worker-socket``): docs/deployment.md §11; the secure round also uses the
  ServerApp's direct channel (run config ``channel-address``); the plain rounds go through
  Flower (about 10 s per round trip), slow enough for the test to kill a tenant between two
  of its messages (on the channel a whole round takes about a second; a lost channel is
  tested in tests/flower/test_direct_channel.py);
- two split-plain rounds through ``flwr run`` with three tenants, one of them killed (SIGKILL
  of its SuperNode's and its worker's process groups: its machine died) in round 1 and
  restarted: the other two finish the round, the log says the third is gone, and in round 2
  it is back with the state its node mirrored on its own disk (node config ``state-dir``), not a fresh one; the workers' cost meters give the
  tenants' client CPU in results.json;
- one secure round (client label protection) with the dealer on a SuperNode of its own
  (``role="dealer"``, ``dealer-key``; tenants pin ``dealer-public-key``, the cloud
  ``expected-dealer-key``).

Every process is started in its own process group and stopped by the fixture's finalizer,
also when a test fails. Skipped, saying so, when the Flower binaries are not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from deploy_harness import LABELS, LocalFederation, binary, missing_binaries, tenant_csv

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Flower CLI binaries not installed: {missing_binaries()}"),
]

# the tiny model with the quick preset's adapters and rates; two micro-batches in one message
# (quick=true itself forces 10 steps in two messages: twice the round trips)
RUN = {"model": "tiny", "head-rank": 8, "tail-bottleneck": 16, "lr-head": 0.02, "lr-tail": 0.3,
       "batch-size": 16, "local-steps": 2, "micro-batches": 2, "num-server-rounds": 1, "eval-every": 0,
       "global-eval": False, "min-nodes": 2, "labels": ",".join(LABELS)}
RUN_TIMEOUT = 900.0


def tenant_config(directory: Path, tenant: int, worker_socket: str) -> str:
    """A tenant's node config: its partition id, its own CSV, its own state directory, its worker."""
    return (f'partition-id={tenant} data-path="{tenant_csv(directory, tenant)}" '
            f'state-dir="{directory / "node-state" / f"tenant-{tenant}"}" worker-socket="{worker_socket}"')


def mirrored_party(directory: Path, tenant: int) -> dict:
    """A tenant node's mirrored split-plain party state (flower_split.flower.node_state)."""
    from flower_split.flower.node_state import NODE, records_from_tree
    from flower_split.flower.plain_handlers import PARTY_ARRAYS, PARTY_CONFIG
    from flower_split.flower.context_state import records_to_state
    from flower_split.state import read_party

    (session,) = (directory / "node-state" / f"tenant-{tenant}").iterdir()
    saved = read_party(session / "tenants" / f"tenant-{tenant}", NODE)
    records = records_from_tree(saved.state, saved.meta_file)
    return records_to_state(records[PARTY_ARRAYS], records[PARTY_CONFIG])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """SuperLink (TLS, node auth) and three registered tenants, each on its own CSV."""
    fed = LocalFederation(tmp_path_factory.mktemp("deployment"))
    try:
        fed.start_superlink()
        keys = fed.node_keys("tenant-0", "tenant-1", "tenant-2", "rogue")
        for tenant in range(3):
            name = f"tenant-{tenant}"
            fed.register(keys[name][1])
            _, worker_socket = fed.start_worker(name)
            fed.start_supernode(name, keys[name][0], tenant_config(fed.dir, tenant, worker_socket))
        fed.keys = keys
        yield fed
    finally:
        fed.stop()
        leftover = fed.alive()
        assert not leftover, f"processes left running: {leftover}"


def test_an_unregistered_supernode_is_refused(federation: LocalFederation) -> None:
    rogue = federation.start_supernode("rogue", federation.keys["rogue"][0], "partition-id=9 num-partitions=10",
                                       "--max-retries", "1")
    rogue.popen.wait(timeout=180)
    assert rogue.popen.returncode != 0
    assert "Failed to activate SuperNode" in rogue.text()
    assert "No SuperNode found with the given public key" in federation.processes[0].text()


def _wait_online(federation: LocalFederation, count: int, timeout: float = 180.0) -> None:
    """Until exactly ``count`` SuperNodes are online (stopped ones go offline, new ones come up)."""
    deadline = time.monotonic() + timeout
    while (online := federation.online_nodes()) != count:
        assert time.monotonic() < deadline, f"{online} SuperNodes online, not {count}, after {timeout} s"
        time.sleep(2.0)


def test_plain_rounds_over_tls_with_a_tenant_killed_mid_round_and_restarted(federation: LocalFederation) -> None:
    """SIGKILL of tenant-2's SuperNode and worker once the worker has handled round 1's first
    message (head_fwd: its node state mirrored on its disk); both restarted with the same key,
    socket and node config once the SuperLink has seen the node go (it refuses to activate a key
    that is still online). Round 1 finishes with the other two; in round 2 tenant-2 is back with
    its own state, not a fresh one: only the stages in flight were lost."""
    _wait_online(federation, 3)
    results = federation.dir / "results-plain"
    victims = [p for p in federation.processes if p.name in ("tenant-2", "worker-tenant-2")]
    outcome: dict = {}  # flwr run --stream blocks until the run ends: run it aside, kill the victim meanwhile
    thread = threading.Thread(target=lambda: outcome.update(done=federation.run(
        # min-nodes 3: round 2 waits for the restarted tenant (on workers a round is faster than a restart)
        {**RUN, "num-server-rounds": 2, "min-nodes": 3, "results-dir": str(results)}, timeout=RUN_TIMEOUT)),
        daemon=True)
    thread.start()
    worker = next(p for p in victims if p.name == "worker-tenant-2")
    federation.wait_for(worker, r"message \d+ \(train\.head_fwd\) handled", timeout=RUN_TIMEOUT)
    for victim in victims:
        federation.kill(victim)
    _wait_online(federation, 2)  # the SuperLink refuses a key that is still online: wait for it to see the death
    _, worker_socket = federation.start_worker("tenant-2-restarted")
    federation.start_supernode("tenant-2-restarted", federation.keys["tenant-2"][0],
                               tenant_config(federation.dir, 2, worker_socket))
    thread.join(RUN_TIMEOUT)
    assert "done" in outcome, "flwr run did not return"
    done = outcome["done"]
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    run = json.loads((results / "results.json").read_text())["runs"][0]
    assert (run["name"], run["runtime"], run["num_server_rounds"]) == ("split-plain", "deployment", 2)
    first, second = run["rounds"]
    assert first["train_loss"] is not None and first["round_trips"] >= 3 and first["wall_seconds"] > 0
    # named by its tenant id, or by its node id when its first reply (which names it) was the one lost
    assert re.search(r"dropping (tenant-2|node-\d+) from this round: train\..*", log), log[-4000:]
    assert run["client_cpu_seconds_per_tenant"] > 0  # the workers' cost meters
    assert sorted(second["per_tenant_accuracy"]) == ["tenant-0", "tenant-1", "tenant-2"], log[-4000:]
    assert run["per_tenant_test_examples"] == {f"tenant-{t}": 8 for t in range(3)}  # 20 % of 40 rows each
    restarted, other = mirrored_party(federation.dir, 2), mirrored_party(federation.dir, 0)
    # round 1's two begun steps came back from its disk: its step count is the others' (2 + 2 + one
    # evaluation batch); a fresh start would be 2 behind
    assert restarted["next_step"] == other["next_step"] == 5
    # lost: round 1's tail update (unless the kill came after it), never more
    assert other["tail_schedule"]["last_epoch"] == 4 and restarted["tail_schedule"]["last_epoch"] in (2, 4)


def test_a_secure_round_with_the_dealer_on_its_own_supernode(federation: LocalFederation) -> None:
    dealer_dir = federation.dir / "dealer"
    keygen = binary("flower-split")
    command = [keygen] if keygen else [sys.executable, "-m", "flower_split.cli"]
    made = subprocess.run([*command, "dealer-keygen", "--out", str(dealer_dir)], capture_output=True, text=True,
                          env=federation.env(federation.cli_home), timeout=120)
    assert made.returncode == 0, made.stderr
    keys = federation.node_keys("dealer", "secure-0", "secure-1")
    federation.register(keys["dealer"][1])
    _, worker_socket = federation.start_worker("dealer")
    federation.start_supernode("dealer", keys["dealer"][0],
                               f'role="dealer" dealer-key="{dealer_dir / "dealer.key"}" worker-socket="{worker_socket}"')
    for tenant in (0, 1):
        name = f"secure-{tenant}"
        federation.register(keys[name][1])
        _, worker_socket = federation.start_worker(name)
        federation.start_supernode(name, keys[name][0], f'partition-id={10 + tenant} '
                                   f'data-path="{tenant_csv(federation.dir, 10 + tenant)}" '
                                   f'dealer-public-key="{dealer_dir / "dealer.pub"}" worker-socket="{worker_socket}"')
    for process in federation.processes:
        if process.name in ("tenant-0", "tenant-1", "tenant-2", "tenant-2-restarted"):
            federation.stop_one(process)
    _wait_online(federation, 3)
    results = federation.dir / "results-secure"
    done = federation.run({**RUN, "security": "secure", "label-protection": "client", "local-steps": 1,
                           "micro-batches": 1, "expected-dealer-key": str(dealer_dir / "dealer.pub"),
                           "results-dir": str(results), "channel-address": "127.0.0.1:0"}, timeout=RUN_TIMEOUT)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    run = json.loads((results / "results.json").read_text())["runs"][0]
    assert run["name"] == "split-secure-client"
    assert sorted(run["rounds"][0]["per_tenant_accuracy"]) == ["tenant-10", "tenant-11"], log[-4000:]
    # the training round's own round trips, as the strategy counts them (a streamed step: its longest
    # chain of messages): one step of 10 and the dealer's material before it (set-up is not in the round)
    assert run["rounds"][0]["round_trips"] == 11 and "direct channel: node" not in log  # none lost, none refused
