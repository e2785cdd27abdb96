"""Cloud body per message vs stacked: forward + backward time of one stage for many tenants.

The Flower strategy hands the cloud every tenant's micro-batches of a stage at once. This
times the cloud on one such stage (``--tenants`` tenants x ``--micro-batches`` micro-batches of
``--rows`` rows, token lengths drawn uniformly from ``--min-tokens``..``--max-tokens``, each
row's own length up to its micro-batch's), two ways on the same inputs:

* per message: ``CloudParty.handle`` once per HeadOutput, then once per BodyGrad (one body
  forward and one backward per micro-batch: the behaviour before stacking);
* stacked: ``CloudParty.handle_many`` on all HeadOutputs, then on all BodyGrads (one forward
  and one backward per group of at most ``--max-stack-rows`` rows that pads at most
  ``--max-padding`` of its tokens);
* stacked, any padding: the same with no padding bound (one group per ``--max-stack-rows``).

Training steps keep no graph by default (the cloud recomputes the forward when the gradient
arrives); ``--keep-graphs`` times the cloud that keeps them.

Reported: median wall ms over ``--reps`` repetitions (after one warm-up) of forward, backward
and both, the number of body forwards (one backward each), the speed-up, and the largest
difference between the two ways' ``h`` and ``dL/df``.
Inputs are random (timing does not depend on their values); no data set is read.

Usage::

    python simulations/bench_stack.py --model tiny
    python simulations/bench_stack.py --model minilm --threads 2 [--device cuda] [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from flower_split.model import build_split
from flower_split.model.adapters import pack_tokens
from flower_split.protocol import BodyGrad, CloudParty, HeadOutput, Message


def make_stage(args: argparse.Namespace, dim: int) -> tuple[list[HeadOutput], list[BodyGrad]]:
    """One stage's HeadOutputs of every tenant and the matching BodyGrads (seeded)."""
    generator = torch.Generator().manual_seed(args.seed)
    heads, grads = [], []
    for tenant in range(args.tenants):
        for step in range(args.micro_batches):
            tokens = int(torch.randint(args.min_tokens, args.max_tokens + 1, (), generator=generator))
            lengths = torch.randint(args.min_tokens // 2, tokens + 1, (args.rows,), generator=generator)
            lengths[0] = tokens
            mask = (torch.arange(tokens) < lengths[:, None]).long()
            f = torch.randn(args.rows, tokens, dim, generator=generator)
            heads.append(HeadOutput(f"t{tenant}", step, pack_tokens(f, mask), mask, True))  # f at the real tokens
            grads.append(BodyGrad(f"t{tenant}", step, torch.randn(f.shape, generator=generator) * 1e-3))
    return heads, grads


Way = tuple[CloudParty, Callable[[list[Message]], list[Message]]]


def measure(cloud: CloudParty, run: Callable[[list[Message]], list[Message]], heads: list[HeadOutput],
            grads: list[BodyGrad], reps: int) -> tuple[float, float, int, list[Message], list[Message]]:
    """Median forward and backward ms over ``reps`` (after one warm-up), the body forwards per
    stage (graphs held before the gradients), and the last replies."""
    forward_ms, backward_ms = [], []
    for _ in range(reps + 1):
        start = time.perf_counter()
        outputs = run(heads)
        middle = time.perf_counter()
        forwards = cloud.graphs_held
        head_grads = run(grads)
        forward_ms.append((middle - start) * 1e3)
        backward_ms.append((time.perf_counter() - middle) * 1e3)
    return (statistics.median(forward_ms[1:]), statistics.median(backward_ms[1:]), forwards, outputs,
            head_grads)


def largest_difference(a: list[Message], b: list[Message], name: str) -> float:
    return max((getattr(x, name) - getattr(y, name)).abs().max().item() for x, y in zip(a, b))


def bench(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    body = build_split(args.model, 77, 8, 16).body
    common = dict(max_stack_rows=args.max_stack_rows, keep_graphs=args.keep_graphs)
    bounded = CloudParty(body, args.device, max_padding=args.max_padding, **common)
    unbounded = CloudParty(body, args.device, max_padding=float("inf"), **common)
    heads, grads = make_stage(args, bounded.dim)
    ways: dict[str, Way] = {"per message": (bounded, lambda messages: [bounded.handle(m) for m in messages]),
                            "stacked": (bounded, bounded.handle_many),
                            "stacked, any padding": (unbounded, unbounded.handle_many)}
    results = {way: measure(cloud, run, heads, grads, args.reps) for way, (cloud, run) in ways.items()}
    tokens = [h.f.shape[1] for h in heads]
    print(f"model {args.model} on {args.device}, {torch.get_num_threads()} threads: {args.tenants} tenants x "
          f"{args.micro_batches} micro-batches x {args.rows} rows, tokens {min(tokens)}-{max(tokens)}, "
          f"max_stack_rows {args.max_stack_rows}, max_padding {args.max_padding}, "
          f"{'graphs kept' if args.keep_graphs else 'forward recomputed at the gradient'}; median of {args.reps}")
    print(f"{'':20} {'forwards':>8} {'forward ms':>11} {'backward ms':>12} {'total ms':>9} {'speed-up':>8}")
    reference = results["per message"]
    for way, (forward_ms, backward_ms, forwards, _, _) in results.items():
        total = forward_ms + backward_ms
        print(f"{way:20} {forwards:8} {forward_ms:11.1f} {backward_ms:12.1f} {total:9.1f} "
              f"{(reference[0] + reference[1]) / total:7.2f}x")
    diff_h = max(largest_difference(reference[3], r[3], "h") for r in results.values())
    diff_f = max(largest_difference(reference[4], r[4], "grad_f") for r in results.values())
    print(f"largest difference to per message: h {diff_h:.1e}, dL/df {diff_f:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=1, help="per tenant")
    parser.add_argument("--rows", type=int, default=32, help="rows per micro-batch")
    parser.add_argument("--min-tokens", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=45)
    parser.add_argument("--max-stack-rows", type=int, default=256)
    parser.add_argument("--max-padding", type=float, default=0.25, help="inf: one group whatever the padding")
    parser.add_argument("--keep-graphs", action="store_true",
                        help="keep each step's graph (CloudParty keep_graphs) instead of recomputing the forward")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    bench(parser.parse_args())


if __name__ == "__main__":
    main()
