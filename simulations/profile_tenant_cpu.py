"""Where a secure tenant's CPU goes, per ClientApp message (issue 15).

    python simulations/profile_tenant_cpu.py --steps 4 [--spill DIR]

Runs one secure training round of one tenant through the real ServerApp strategy and ClientApp
on the in-process grid (:func:`bench_scaling.run_round`, MiniLM, pooled tail, ``client`` labels)
after a one-step warm-up round, and splits the ClientApp's process CPU time
(``time.process_time``) into: the protocol (``SecureClientParty.begin`` / ``handle``), and
within it the ring matmuls (``mpc.limbs.ring_matmul``); writing the party into
``Context.state`` (``secure_handlers._save``); and the rest of the handlers (records in and
out, data rows, instruction checks). It also reports the size of the tensors each save writes
into ``Context.state`` (the state a simulation ships through Ray with every message): the
largest and the smallest (the first save after set-up holds only the halves), and what the
Arrays stored in ``Context.state`` weigh (all-zero shares are stored without bytes). ``--spill DIR``:
the tenant keeps its large state tensors in files under ``DIR`` (:mod:`flower_split.flower.state_spill`,
as a simulation does); the save's share spent writing and deleting them, and the bytes written,
are reported apart. The timers wrap those functions in this process only;
the code they time is unchanged. Process CPU time counts the whole process, so run it on an
otherwise idle machine: another process on the same cores inflates every share a little.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from typing import Any, Callable

import torch
from flwr.supercore.task_identity import TaskIdentity

import flower_split.flower.secure_handlers as secure_handlers
import flower_split.flower.state_spill as state_spill
import flower_split.flower.tenant as tenant
import flower_split.mpc.beaver as beaver
import flower_split.mpc.limbs as limbs
from flower_split.flower.context_state import state_tensor_bytes
from bench_scaling import run_round
from flower_split.protocol.secure_client import SecureClientParty

SPENT: dict[str, float] = {}
_INSIDE: set[str] = set()
STATE_BYTES: list[tuple[int, int]] = []  # (the party's tensors, the Arrays stored) per save
SPILLED: list[int] = []  # bytes of each file the spill wrote


def _timed(name: str, fn: Callable[..., Any], only_inside: str | None = None) -> Callable[..., Any]:
    """``fn`` adding its process CPU time to ``SPENT[name]`` (only while ``only_inside`` runs, if given)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if only_inside is not None and only_inside not in _INSIDE:
            return fn(*args, **kwargs)
        _INSIDE.add(name)
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.process_time() - start
            _INSIDE.discard(name)
    return wrapper


def _measured_save(save: Callable[..., Any]) -> Callable[..., Any]:
    """``save`` recording the bytes of the party's state tensors and of the Arrays it stored (not
    timed: it wraps the timed ``save``)."""
    @functools.wraps(save)
    def wrapper(context: Any, party: SecureClientParty, *args: Any, **kwargs: Any) -> Any:
        tensors = state_tensor_bytes(party.state_dict(copy=False))
        result = save(context, party, *args, **kwargs)
        stored = sum(len(array.data) for array in context.state[secure_handlers.SECURE_ARRAYS].values())
        STATE_BYTES.append((tensors, stored))
        return result
    return wrapper


def instrument() -> None:
    tenant.handle = _timed("clientapp", tenant.handle)  # client_app imports it at call time
    SecureClientParty.begin = _timed("protocol", SecureClientParty.begin)
    SecureClientParty.handle = _timed("protocol", SecureClientParty.handle)
    secure_handlers._save = _measured_save(_timed("save", secure_handlers._save))
    beaver.ring_matmul = _timed("ring_matmul", limbs.ring_matmul, only_inside="protocol")
    write = state_spill.SpillStore._write

    def counted_write(store: state_spill.SpillStore, data: bytes, generation: int) -> str:
        SPILLED.append(len(data))
        return write(store, data, generation)
    state_spill.SpillStore._write = _timed("spill", counted_write)
    state_spill.SpillStore._collect = _timed("spill", state_spill.SpillStore._collect)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps of 32 rows in the measured round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spill", metavar="DIR", help="keep the state's large tensors in files under DIR")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be positive")
    torch.set_num_threads(args.threads)
    os.environ[state_spill.SPILL_ENV] = args.spill or state_spill.SPILL_OFF
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0  # Message() outside a runtime
    instrument()
    run_round("minilm", "secure", 1, 1, 32, 64)  # warm-up: imports, model and data loading
    SPENT.clear()
    STATE_BYTES.clear()
    SPILLED.clear()
    row = run_round("minilm", "secure", 1, args.steps, 32, 64)
    total, samples = SPENT["clientapp"], row["samples"]
    parts = {"protocol: ring matmuls": SPENT.get("ring_matmul", 0.0),
             "protocol: the rest": SPENT["protocol"] - SPENT.get("ring_matmul", 0.0),
             "saving the party into Context.state": SPENT.get("save", 0.0) - SPENT.get("spill", 0.0),
             "of the save: the spill's files written and deleted": SPENT.get("spill", 0.0),
             "the rest of the handlers": total - SPENT["protocol"] - SPENT.get("save", 0.0)}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} torch thread(s); {row['round_trips']} round trips, {samples} training samples")
    print("| ClientApp CPU | s | share | ms / training sample |")
    print("|---|---:|---:|---:|")
    for name, seconds in [*parts.items(), ("all handlers", total)]:
        print(f"| {name} | {seconds:.3f} | {100 * seconds / total:.0f} % | {1e3 * seconds / samples:.2f} |")
    tensors, stored = max(STATE_BYTES), max(STATE_BYTES, key=lambda pair: pair[1])
    print(f"# the party's state tensors at a save: {tensors[0] / 2**20:.1f} MiB at most "
          f"({tensors[1] / 2**20:.1f} MiB of it stored: all-zero shares cost no bytes), "
          f"{min(STATE_BYTES)[0] / 2**20:.1f} MiB at least, over {len(STATE_BYTES)} saves; "
          f"Context.state's Arrays {stored[1] / 2**20:.1f} MiB at most, "
          f"{sum(pair[1] for pair in STATE_BYTES) / 2**20:.0f} MiB over all saves "
          f"(the tensors: {sum(pair[0] for pair in STATE_BYTES) / 2**20:.0f} MiB)")
    if args.spill:
        print(f"# spilled: {len(SPILLED)} files, {sum(SPILLED) / 2**20:.1f} MiB written over {args.steps} steps")


if __name__ == "__main__":
    main()
