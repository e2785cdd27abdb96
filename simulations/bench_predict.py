"""Inference throughput of a saved tenant: texts per second, split-plain vs split-secure, in process.

For each security level it trains one tenant briefly (``--train-samples`` Banking77 rows, one
epoch: the weights only need to exist), saves every party with ``train(state_dir=...)``, loads
them back with :class:`SplitClassifier` (fresh objects, as a new process would) and times
``predict`` over ``--texts`` Banking77 test texts (after a one-batch warm-up). Times are compute
only: no network between the parties (the secure protocol's 5 round trips per batch would add
latency); the load time (model, states) is reported apart.

Usage: ``python simulations/bench_predict.py [--model minilm] [--texts 256] [--batch 32] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from flower_split.api import SplitClassifier, train
from flower_split.config import RunConfig
from flower_split.data import load_dataset

LEVELS = {"plain": dict(security="plain"), "secure-client": dict(security="secure", label_protection="client"),
          "secure-he": dict(security="secure", label_protection="he")}


def bench(level: str, args: argparse.Namespace, texts: list[str], out: Path) -> dict:
    """Train, save, reload and time ``predict`` for one security level."""
    config = RunConfig(model=args.model, epochs=1, batch_size=args.batch, max_train_samples=args.train_samples,
                       max_test_samples=args.batch, device="cpu", **LEVELS[level])
    root = out / level / "state"
    train(config, progress=False, state_dir=root)
    started = time.perf_counter()
    classifier = SplitClassifier.load(root)
    load_s = time.perf_counter() - started
    classifier.predict(texts[: args.batch])  # warm-up
    started = time.perf_counter()
    predictions = classifier.predict(texts, batch_size=args.batch)
    seconds = time.perf_counter() - started
    return {"level": level, "texts": len(predictions), "seconds": round(seconds, 2),
            "texts_per_s": round(len(predictions) / seconds, 1), "load_s": round(load_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-samples", type=int, default=64)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--out", default=None, help="where the states go (default: a temp directory)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    texts = load_dataset("banking77")[1].texts[: args.texts]
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-predict-"))
    for level in args.levels:
        print(json.dumps(bench(level, args, texts, out)), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
