"""Message fuzzing, long variant (issue 13): thousands of mutated messages against both protocols.

Every world of ``tests/fuzz_plain.py`` and ``tests/fuzz_secure.py`` (tiny configurations:
plain with and without a trained head, per-token or pooled tail; secure in ``client`` and
``he`` label protection) runs its control script once; then, event by event, each message a
party receives (set-up, dealer, key rotation, update counts and every step message) is
replaced by mutated copies (``tests/fuzz_strategies.py``: shapes, dtypes, meta / sparse /
non-contiguous tensors, truncation, NaN / Inf, step numbers, tenant ids, types, keys), by other
messages of the trace (stage order, replays, another tenant's messages) or delivered twice.
The oracle (``tests/fuzz_worlds.py``) classifies each: rejected cleanly / accepted harmlessly /
corrupted state / crashed with an unexpected exception type. Prints a table and, with
``--out``, writes it as Markdown::

    python simulations/fuzz_messages.py --messages 5000 [--seed 0] [--out fuzz.md]
"""

from __future__ import annotations

import argparse
import collections
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_plain import PLAIN_VARIANTS, PlainWorld  # noqa: E402
from fuzz_secure import SECURE_VARIANTS, SecureWorld  # noqa: E402
from fuzz_strategies import random_mutation  # noqa: E402
from fuzz_worlds import (  # noqa: E402
    ACCEPTED, CORRUPTED, CRASHED, OUTCOMES, REJECTED, Duplicate, Outcome, Swap, check_case, control_run, fuzzable,
)


def _inputs(rng: random.Random, per_case: int) -> list:
    inputs: list = [random_mutation(rng) for _ in range(per_case)]
    if rng.random() < 0.5:
        inputs.append(Swap(rng.randrange(1 << 16)))
    if rng.random() < 0.25:
        inputs.append(Duplicate())
    return inputs


def fuzz_world(world, budget: int, rng: random.Random, per_case: int) -> list[Outcome]:
    """About ``budget`` mutated messages over the world's events, round robin."""
    control = control_run(world)
    events = fuzzable(world)
    outcomes: list[Outcome] = []
    turn = 0
    while len(outcomes) < budget:
        k = events[turn % len(events)]
        turn += 1
        inputs = _inputs(rng, per_case)
        found = check_case(world, control, k, inputs)
        if any(o.verdict == CORRUPTED for o in found) and len(inputs) > 1:  # attribute: one input at a time
            found = [o for item in inputs for o in check_case(world, control, k, [item])]
        outcomes += found
    return outcomes


def _row(name: str, outcomes: list[Outcome]) -> str:
    counts = collections.Counter(o.verdict for o in outcomes)
    refused = sum(1 for o in outcomes if o.refused_after)
    return (f"| {name} | {len(outcomes):,} | {counts[REJECTED]:,} | {counts[ACCEPTED]:,} ({refused}) | "
            f"{counts[CORRUPTED]} | {counts[CRASHED]} |")


def report(results: dict[str, list[Outcome]], seconds: float, args: argparse.Namespace) -> str:
    everything = [o for outcomes in results.values() for o in outcomes]
    lines = ["| world | tried | rejected cleanly | accepted harmlessly (of which the tenant is then refused) "
             "| corrupted state | crashed (unexpected exception) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [_row(name, outcomes) for name, outcomes in results.items()]
    lines.append(_row("**all**", everything))
    lines.append("")
    lines.append(f"`python simulations/fuzz_messages.py --messages {args.messages} --seed {args.seed}`: "
                 f"{seconds:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
                 f"Python {platform.python_version()}.")
    bad = [o for o in everything if o.verdict in (CORRUPTED, CRASHED)]
    if bad:
        lines += ["", "Findings (first 30):", ""]
        seen = set()
        for o in bad:
            key = (o.verdict, o.event, o.label.split("@")[0], o.detail[:60])
            if key not in seen and len(seen) < 30:
                seen.add(key)
                lines.append(f"- {o.verdict}: {o.event} <- {o.label}: {o.detail}")
    by_event = collections.Counter(o.event for o in everything)
    lines += ["", f"Receiving events (method, and schedule stage for step messages): {len(by_event)}; "
                  f"kinds of mutation: {len({o.label.split('@')[0].split('<-')[0] for o in everything})}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="mutated messages in all (about)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-case", type=int, default=4, help="mutations per event visit")
    parser.add_argument("--out", type=Path, default=None, help="write the table as Markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # sparse CSR "beta", scalar conversions
    rng = random.Random(args.seed)
    worlds = [(f"plain {v.batch}x, head {'trained' if v.train_head else 'frozen'}, tail {v.tail_input}",
               lambda v=v: PlainWorld(v)) for v in PLAIN_VARIANTS]
    worlds += [(f"secure {v.mode} {v.batch}x, head {'trained' if v.train_head else 'frozen'}, tail {v.tail_input}",
                lambda v=v: SecureWorld(v)) for v in SECURE_VARIANTS]
    budget = -(-args.messages // len(worlds))
    started = time.perf_counter()
    results: dict[str, list[Outcome]] = {}
    for name, make in worlds:
        tick = time.perf_counter()
        results[name] = fuzz_world(make(), budget, rng, args.per_case)
        counts = collections.Counter(o.verdict for o in results[name])
        print(f"{name}: {len(results[name])} messages in {time.perf_counter() - tick:.0f} s "
              f"({', '.join(f'{counts[v]} {v}' for v in OUTCOMES)})", flush=True)
    table = report(results, time.perf_counter() - started, args)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
