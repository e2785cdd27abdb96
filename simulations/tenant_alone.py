"""Per-tenant accuracy without Flower: tune a tenant's adapters cheaply.

Trains split-plain (or, with ``--set security=secure``, split-secure; or, with ``--mode
centralized``, peft LoRA on the whole model) in process on the training partition of each chosen tenant (the same
partition and per-tenant test split a Flower run with the same seed, partition and tenant count
uses) and reports each tenant's accuracy on its own test split, plus the example-weighted mean.
A federated split run trains the same kind of per-tenant model (the adapters are private, the body
frozen; it counts local steps per round where this counts epochs), so this predicts its
per-tenant accuracy without Ray or Flower round trips.

    python simulations/tenant_alone.py --tenants 0,1 --set epochs=6
    python simulations/tenant_alone.py --tenants 0,1 --set epochs=1 --set security=secure --set label_protection=he
    python simulations/tenant_alone.py --tenants 0,1 --mode centralized   # LoRA on one tenant's data alone
"""

from __future__ import annotations

import argparse
import time

import torch

from flower_split.config import parse_set
from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.data.tenants import tenant_splits
from flower_split.model import load_tokenizer
from flower_split.backends import backend_for
from flower_split.train import train_centralized

DEFAULTS = {"model": "minilm", "dataset": "banking77", "epochs": 3, "device": "cpu", "security": "plain"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", default="0,1,2", help="comma-separated tenant (partition) ids")
    parser.add_argument("--mode", choices=("split", "centralized"), default="split",
                        help="split adapters (default) or LoRA on the whole model, trained on the tenant's data only")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="RunConfig field (repeatable, JSON values), e.g. --set lr_tail=0.2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    config = RunConfig.from_mapping({**DEFAULTS, **overrides, "mode": args.mode}).validate()
    trainer = backend_for(config).train_in_process if args.mode == "split" else train_centralized
    splits = tenant_splits(config, args.partition, args.num_clients)
    tokenizer = load_tokenizer(config.model)
    correct = total = 0.0
    for tenant in (int(t) for t in args.tenants.split(",")):
        train, test = splits.tenant_train(tenant), splits.tenant_test(tenant)
        started = time.perf_counter()
        run = trainer(config, TokenizedDataset(train, tokenizer, config.max_length),
                          TokenizedDataset(test, tokenizer, config.max_length), splits.num_classes, progress=False)
        correct += run["test_accuracy"] * len(test)
        total += len(test)
        losses = ", ".join(f"{loss:.3f}" for loss in run["train_loss_history"])
        print(f"tenant {tenant}: {len(train)} train / {len(test)} test rows, {len(set(train.labels))} classes, "
              f"accuracy {run['test_accuracy']:.4f}, train loss per epoch [{losses}], "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    kind = "centralized LoRA" if args.mode == "centralized" else backend_for(config).run_name(config)
    print(f"example-weighted per-tenant accuracy {correct / total:.4f} ({config.epochs} epochs, {kind})")


if __name__ == "__main__":
    main()
