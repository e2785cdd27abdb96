"""How often the quick preset diverges from random adapter starts (the tenant's CSPRNG).

Trains ``QUICK`` (tiny model, split-plain, in process) N times, each from a fresh random
start, and counts the runs that diverge (a non-finite loss or head output) against those
that learn; prints one line per run and a summary::

    python simulations/quick_stability.py --runs 12 [--lr-head 0.05 --lr-tail 0.5]
"""

from __future__ import annotations

import argparse

from flower_split.api import train
from flower_split.config import QUICK, RunConfig
from flower_split.protocol import ProtocolError, TrainingDiverged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--lr-head", type=float, default=QUICK["lr_head"])
    parser.add_argument("--lr-tail", type=float, default=QUICK["lr_tail"])
    args = parser.parse_args()
    diverged = 0
    for run in range(args.runs):
        config = RunConfig(**{**QUICK, "device": "cpu", "lr_head": args.lr_head, "lr_tail": args.lr_tail})
        try:
            result = train(config, progress=False)
        except (TrainingDiverged, ProtocolError) as exc:
            diverged += 1
            print(f"run {run}: diverged ({type(exc).__name__})", flush=True)
            continue
        losses = result["train_loss_history"]
        print(f"run {run}: accuracy {result['test_accuracy']:.3f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    print(f"lr_head {args.lr_head}, lr_tail {args.lr_tail}: {diverged} of {args.runs} random starts diverged")


if __name__ == "__main__":
    main()
