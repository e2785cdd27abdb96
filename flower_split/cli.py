"""Command line: ``flower-split train ...``.

Every option maps onto a :class:`RunConfig` field; the config is validated before any model
or data is loaded, so a bad value fails in milliseconds with the field's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from flower_split.config import MODES, SECURITY_LEVELS, ConfigError, RunConfig
from flower_split.data import DatasetError

# --quick: the tiny random model on a few hundred samples; a smoke run in seconds.
QUICK = dict(model="tiny", epochs=3, max_train_samples=1000, max_test_samples=300,
             head_rank=8, tail_bottleneck=16, lr_head=0.05, lr_tail=0.5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flower-split", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train in process (no Flower): centralized LoRA or split")
    train.add_argument("--mode", choices=MODES, default="split")
    train.add_argument("--security", choices=SECURITY_LEVELS, default="plain")
    train.add_argument("--dataset", default="banking77", help="banking77, sst2 or a data directory")
    train.add_argument("--data-dir", default=None, help="directory holding the dataset's files")
    train.add_argument("--model", default=None, help="minilm (default), tiny, or a local HF model path")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    train.add_argument("--out", required=True, help="output directory for results.json")
    train.add_argument("--quick", action="store_true",
                       help="tiny model, a few hundred samples: a smoke run in seconds")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="any other RunConfig field, e.g. --set lr_tail=0.2 (JSON values)")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then --quick, then explicit options, then --set; validated."""
    values: dict[str, object] = dict(QUICK) if args.quick else {}
    for name in ("mode", "security", "dataset", "data_dir", "model", "epochs", "batch_size",
                 "seed", "device"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    for item in args.set:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return RunConfig.from_mapping(values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ConfigError, TypeError) as exc:
        print(f"flower-split: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from flower_split.api import train, write_results

    try:
        run = train(config, progress=not args.no_progress)
    except (DatasetError, FileNotFoundError) as exc:
        print(f"flower-split: {exc}", file=sys.stderr)
        return 2
    path = write_results(args.out, [run])
    print(f"{run['name']}: test accuracy {run['test_accuracy']:.4f}, macro-F1 {run['test_macro_f1']:.4f}, "
          f"{run['wall_seconds']:.1f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
