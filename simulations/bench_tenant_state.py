"""What a secure tenant spends on its state between messages.

Runs the real secure strategy and ClientApps on the in-process ``LocalGrid`` (no Flower latency;
the dealer is its own node) for one tenant, ``--steps`` training steps of 32 rows, and times the
tenant's handlers (process CPU seconds around every ClientApp call to the tenant's node; median
of ``--repeats`` runs). Every message loads the tenant's secure party from ``Context.state`` and
writes it back; the largest state a message wrote (mid-step) is then written and read again
in the current format (raw bytes, ``context_state.STATE_STYPE``, from the live tensors) and in
Flower's ``.npy`` arrays from copied tensors (the format and copies before, for comparison).
Run it on an older checkout for the tenant CPU before a change.

    python simulations/bench_tenant_state.py --model minilm --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from flower_helpers import LocalGrid  # noqa: E402  (the test grid: tenant partitions and a dealer node)

from flower_split.apps.client_app import make_client_app  # noqa: E402
from flower_split.apps.server_app import run_cloud  # noqa: E402
from flower_split.flower import secure_handlers  # noqa: E402
from flower_split.flower.context_state import records_to_state, state_tensor_bytes, state_to_records  # noqa: E402
from flower_split.flower.records import array_to_tensor  # noqa: E402


def run_once(config: dict) -> dict:
    """One secure run for one tenant: its handler CPU seconds, messages, and the largest state it wrote."""
    app = make_client_app(config)
    spent: dict = {"cpu": 0.0, "messages": 0, "largest": ({}, 0)}
    write = secure_handlers.state_to_records

    def watched(state: dict) -> tuple:
        size = state_tensor_bytes(state)
        if size > spent["largest"][1]:
            spent["largest"] = (state, size)
        return write(state)

    def timed(message: Message, context: Context) -> Message:
        started = time.process_time()
        reply = app(message, context)
        if context.node_id == 1:
            spent["cpu"] += time.process_time() - started
            spent["messages"] += 1
        return reply

    secure_handlers.state_to_records = watched
    try:
        run_cloud(LocalGrid(timed, 1, dealer=tempfile.mkdtemp()), config)
    finally:
        secure_handlers.state_to_records = write
    return spent


def codec_seconds(state: dict, repeats: int = 5) -> dict:
    """Write and read one state both ways: raw bytes of the live tensors (now), and Flower's .npy
    arrays of copied tensors (before: ``state_dict`` cloned, then ``Array(ndarray)``)."""
    timings: dict[str, list[float]] = {"raw_write": [], "raw_read": [], "npy_write": [], "npy_read": []}
    for _ in range(repeats):
        started = time.perf_counter()
        arrays, meta = state_to_records(state)
        timings["raw_write"].append(time.perf_counter() - started)
        started = time.perf_counter()
        records_to_state(arrays, meta)
        timings["raw_read"].append(time.perf_counter() - started)
        tensors = list(_tensors(state))
        started = time.perf_counter()
        npy = ArrayRecord({f"t{i}": Array(t.contiguous().clone().numpy()) for i, t in enumerate(tensors)})
        timings["npy_write"].append(time.perf_counter() - started)
        started = time.perf_counter()
        [array_to_tensor(k, a) for k, a in npy.items()]
        timings["npy_read"].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in timings.items()}


def _tensors(value: object):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0  # outside a Flower runtime
    config = {"model": args.model, "device": "cpu", "partition": "iid", "security": "secure",
              "label-protection": "client", "global-eval": False, "local-steps": args.steps, "micro-batches": 8,
              "num-server-rounds": 1, "min-nodes": 1, "max-train-samples": 32 * args.steps,
              "max-test-samples": 32, "batch-size": 32, "max-length": 64, "head-rank": 64,
              "tail-bottleneck": 256, "reply-timeout": 600.0, "eval-every": 0}
    runs = [run_once(config) for _ in range(args.repeats)]
    result = {"model": args.model, "steps": args.steps, "repeats": args.repeats, "messages": runs[0]["messages"],
              "tenant_cpu_s": statistics.median(r["cpu"] for r in runs)}
    state, size = runs[-1]["largest"]  # the largest state a message wrote (mid-step)
    result["largest_state_mb"] = size / 2**20
    result.update(codec_seconds(state))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
