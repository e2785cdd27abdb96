"""Benchmark of the 2PC layer at the real adapter shapes (MiniLM, batch 32 x 24 tokens).

Prints three markdown tables:

1. exact ring matmul mod 2^64: int64 ``torch.matmul`` vs float64 limbs (22- and 16-bit),
   with plain float64 (inexact) as the floor;
2. one Beaver product per op: online compute per party (begin + finish), bytes each
   party sends, rounds, and dealer material bytes per party;
3. whole staged programs (adapter and classifier, forward and backward).

Usage:  python simulations/bench_mpc.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from flower_split.mpc import (
    LocalTwoParty,
    PartyState,
    Quadratic,
    TripleRequest,
    TrustedDealer,
    adapter_backward,
    adapter_forward,
    begin,
    classifier_backward,
    classifier_forward,
    random_ring,
    ring_matmul,
    share,
    share_ring,
)

BATCH, TOKENS, DIM, RANK, CLASSES = 32, 24, 384, 64, 77
N = BATCH * TOKENS

# (m, k, n, where it occurs)
MATMULS = [
    (N, DIM, RANK, "adapter fwd x@A / bwd gh=gy@B^T"),
    (DIM, N, RANK, "adapter bwd gA=x^T@gu"),
    (N, RANK, DIM, "adapter fwd h@B / bwd gu@A^T"),
    (RANK, N, DIM, "adapter bwd gB=h^T@gy"),
    (BATCH, DIM, CLASSES, "classifier fwd p@Wc"),
    (DIM, BATCH, CLASSES, "classifier bwd gWc=p^T@gz"),
    (BATCH, CLASSES, DIM, "classifier bwd gp=gz@Wc^T"),
]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kib(nbytes: int) -> str:
    return f"{nbytes / 1024:,.1f}"


def ring_matmul_table(repeats: int) -> None:
    print("\n### Exact ring matmul mod 2^64 (ms, median)\n")
    print("| m x k @ k x n | occurs in | int64 torch.matmul | limbs w=22 | limbs w=16 "
          "| float64 (inexact floor) | speed-up w=22 vs int64 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m, k, n, role in MATMULS:
        a, b = random_ring((m, k)), random_ring((k, n))
        assert torch.equal(ring_matmul(a, b), a @ b)
        af, bf = a.double(), b.double()
        t_int = median_ms(lambda: a @ b, repeats)
        t22 = median_ms(lambda: ring_matmul(a, b, 22), repeats)
        t16 = median_ms(lambda: ring_matmul(a, b, 16), repeats)
        t_f = median_ms(lambda: af @ bf, repeats)
        print(f"| {m}x{k} @ {k}x{n} | {role} | {t_int:.2f} | {t22:.2f} | {t16:.2f} | {t_f:.2f} | {t_int / t22:.1f}x |")


def beaver_table(repeats: int) -> None:
    requests = [(TripleRequest.matmul((m, k), (k, n)), f"matmul {m}x{k} @ {k}x{n}") for m, k, n, _ in MATMULS]
    requests += [
        (TripleRequest.square((N, RANK)), f"square {N}x{RANK} (activation)"),
        (TripleRequest.mul((N, RANK)), f"mul {N}x{RANK} (gh * act'(u))"),
    ]
    print("\n### One Beaver product (online phase, per party)\n")
    print("| op | compute ms (begin+finish, one party) | sent per party KiB | rounds "
          "| dealer -> cloud B | dealer -> client KiB |")
    print("|---|---:|---:|---:|---:|---:|")
    dealer = TrustedDealer()
    for request, label in requests:
        (m0,), (m1,) = dealer.deal([request])
        t0, t1 = m0.expand(), m1.expand()
        x0, x1 = share_ring(random_ring(request.x_shape) >> 40)
        y0, y1 = share_ring(random_ring(request.y_shape) >> 40) if request.y_shape else (None, None)
        _, opening1 = begin(request, x1, y1, t1)

        def online() -> object:
            pending, _ = begin(request, x0, y0, t0)
            return pending.finish(opening1)

        ms = median_ms(online, repeats)
        sent = 8 * request.opened_elements
        print(f"| {label} | {ms:.2f} | {kib(sent)} | 1 | {m0.nbytes} | {kib(m1.nbytes)} |")


def program_table(repeats: int) -> None:
    act = Quadratic(0.5, 0.25, 0.125)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, TOKENS, DIM, generator=g)
    values = {
        "x": x, "A": 0.05 * torch.randn(DIM, RANK, generator=g), "B": 0.05 * torch.randn(RANK, DIM, generator=g),
        "gy": 0.01 * torch.randn(BATCH, TOKENS, DIM, generator=g),
        "p": x.mean(1), "Wc": 0.05 * torch.randn(DIM, CLASSES, generator=g), "bc": torch.zeros(CLASSES),
        "gz": 0.01 * torch.randn(BATCH, CLASSES, generator=g),
    }
    states = PartyState(0, scope="forward"), PartyState(1, scope="forward")
    for name, value in values.items():
        states[0].values[name], states[1].values[name] = share(value)
    programs = [
        adapter_forward(BATCH, TOKENS, DIM, RANK, act),
        adapter_backward(BATCH, TOKENS, DIM, RANK, act),
        adapter_backward(BATCH, TOKENS, DIM, RANK, act, input_grad=False),
        classifier_forward(BATCH, DIM, CLASSES),
        classifier_backward(BATCH, DIM, CLASSES),
    ]
    dealer = TrustedDealer()
    parties = LocalTwoParty(dealer)
    parties.run(programs[0], *states)  # produces u, h for the backward programs
    runs = max(1, repeats // 2)
    runs_done = iter(range(10**6))  # each run masks its values afresh: a scope of its own
    print("\n### Staged programs (B=32, T=24, d=384, r=64, C=77)\n")
    print("Each program alone (its scope opens every value it uses; after the forward, a backward reuses\n"
          "x, A, B, h, and the classifier backward p, Wc). Dealer columns: one independent triple per product.\n")
    print("| program | rounds | sent per party KiB | dealer -> client KiB | dealer ms (offline) "
          "| online ms, both parties in turn |")
    print("|---|---:|---:|---:|---:|---:|")
    for program in programs:
        partial = program.name == "adapter.backward" and "gx" not in program.outputs
        label = program.name + (" (no input grad)" if partial else "")
        start = time.perf_counter()
        dealt0, dealt1 = dealer.deal(program.requests() * (runs + 1))
        dealer_ms = 1e3 * (time.perf_counter() - start) / (runs + 1)
        def run() -> None:
            scope = f"{program.name}/{next(runs_done)}"
            parties.run(program, *(PartyState(s.party, dict(s.values), scope=scope) for s in states))

        online_ms = median_ms(run, runs)
        client_bytes = sum(material.nbytes for material in dealt1[: len(program.requests())])
        print(f"| {label} | {program.rounds} | {kib(8 * program.opened_elements())} | {kib(client_bytes)} "
              f"| {dealer_ms:.1f} | {online_ms:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    ring_matmul_table(args.repeats)
    beaver_table(args.repeats)
    program_table(args.repeats)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
