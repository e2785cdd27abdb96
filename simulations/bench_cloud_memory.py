"""Peak memory and time of the cloud on one training stage: graphs kept vs forward recomputed.

One stage of ``--tenants`` tenants x ``--micro-batches`` micro-batches of ``--rows`` rows and
``--tokens`` tokens (random inputs) goes through ``CloudParty.handle_many``: all head outputs,
then all body-output gradients. Reports the process's peak RSS and the two calls' wall time.
Run each mode in its own process (peak RSS only grows)::

    python simulations/bench_cloud_memory.py --mode recompute
    python simulations/bench_cloud_memory.py --mode keep
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from flower_split.model import build_split
from flower_split.protocol import BodyGrad, CloudParty, HeadOutput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["keep", "recompute"], required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=44)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    body = build_split(args.model, 77, 8, 16).body
    cloud = CloudParty(body, keep_graphs=args.mode == "keep")
    generator = torch.Generator().manual_seed(0)
    shape = (args.rows, args.tokens, cloud.dim)
    heads = [HeadOutput(f"tenant-{t}", s, torch.randn((args.rows * args.tokens, cloud.dim), generator=generator),
                        torch.ones(args.rows, args.tokens, dtype=torch.long), True)  # f at the (all real) tokens
             for t in range(args.tenants) for s in range(args.micro_batches)]
    grads = [BodyGrad(h.tenant, h.step, torch.randn(shape, generator=generator)) for h in heads]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB
    started = time.perf_counter()
    cloud.handle_many(heads)
    forward = time.perf_counter() - started
    cloud.handle_many(grads)
    backward = time.perf_counter() - started - forward
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.model}, {args.mode}: {len(heads)} micro-batches of {args.rows} x {args.tokens}, "
          f"{torch.get_num_threads()} threads: peak RSS {peak:.2f} GB ({before:.2f} GB before the stage), "
          f"forward call {forward:.1f} s, gradient call {backward:.1f} s, total {forward + backward:.1f} s")


if __name__ == "__main__":
    main()
