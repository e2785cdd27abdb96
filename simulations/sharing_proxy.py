"""A seconds-per-run model of cross-tenant sharing: linear classifiers on the frozen body, averaged.

A split run with sharing on MiniLM costs ~10-15 minutes of this 2-core VM per round, so the
questions "how many rounds reach 93 % per tenant?" and "which personal step pays?" cannot be
answered by trying. This script answers them on a proxy: each tenant trains only a linear
classifier on the frozen body's mean-pooled output (the split tail's input at initialisation;
no head, no tail adapter), the way the split trainer trains its classifier (SGD momentum 0.9,
batch 32, warm-up + cosine over all rounds, the raw features, one local epoch per round), and
after every round but the last (``--final local``, what ``share = "all"`` does) or every round
(``--final average``) the tenants' classifiers are averaged with weight 1 each (what the SecAgg+
phase computes). ``--share none`` is private split.

Each final model is scored on the tenant's own test split four ways:

* ``plain``: the model's argmax;
* ``classes``: restricted to the classes the tenant has training rows of;
* ``prior``: plus the log of the tenant's own label frequencies (Laplace-smoothed), i.e. the
  Bayes correction of a model trained for a uniform prior to the tenant's prior (Banking77's
  training rows are close to uniform over its 77 classes);
* ``prior/global``: plus ``log p_tenant - log p_all``, the exact correction for a model trained on
  everyone's label frequencies (``p_all`` would need the tenants' summed label counts, e.g. one
  more SecAgg+ sum).

``--offset`` trains each tenant with that same log-frequency vector added to its logits (a fixed,
personal, never averaged offset: logit adjustment as in FedLC), so local training does not have to
pull the shared classifier towards the tenant's prior; its own predictions are then the ``prior``
column (``plain`` drops the offset).

Fidelity is checked against the measured split runs (docs/BENCHMARKS.md, issue 18): run it for
the rounds those ran and compare the ``plain`` column.

    python simulations/sharing_proxy.py --rounds 3,6,10 --share all none
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from flower_split.data.tenants import TenantSplits
from flower_split.model import log_label_frequencies
from flower_split.protocol.optim import lr_factor
from flower_split.train.probes import add_feature_arguments, features_from_arguments

SCORES = ("plain", "classes", "prior", "prior/global")


def train(splits: TenantSplits, feats: dict[str, torch.Tensor], rounds: int, share: bool, final: str,
          lr: float, seed: int, offset: bool = False, batch_size: int = 32, momentum: float = 0.9,
          warmup: float = 0.06) -> list[torch.nn.Linear]:
    """Every tenant's final linear classifier after ``rounds`` rounds of one local epoch."""
    torch.manual_seed(seed)
    x, y = feats["train"], torch.tensor(splits.train.labels)
    start = torch.nn.Linear(x.shape[1], splits.num_classes)
    models = [torch.nn.Linear(x.shape[1], splits.num_classes) for _ in splits.train_rows]
    for model in models:
        model.load_state_dict(start.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in models]
    rows = [torch.tensor(r, dtype=torch.long) for r in splits.train_rows]
    totals = [rounds * math.ceil(len(r) / batch_size) for r in rows]
    done = [0] * len(rows)
    offsets = [log_label_frequencies(y[r], splits.num_classes) if offset else torch.zeros(splits.num_classes)
               for r in rows]
    generator = torch.Generator().manual_seed(seed)
    for round_index in range(rounds):
        for k, (model, optimizer, own) in enumerate(zip(models, optimizers, rows)):
            order = own[torch.randperm(len(own), generator=generator)]
            for first in range(0, len(order), batch_size):
                batch = order[first:first + batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(done[k], totals[k], warmup)
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]) + offsets[k], y[batch]).backward()
                optimizer.step()
                done[k] += 1
        if share and (round_index < rounds - 1 or final == "average"):
            with torch.no_grad():
                for tensors in zip(*(m.parameters() for m in models)):
                    mean = torch.stack(tensors).mean(0)
                    for tensor in tensors:
                        tensor.copy_(mean)
    return models


def scores(splits: TenantSplits, feats: dict[str, torch.Tensor], models: list[torch.nn.Linear]) -> dict[str, float]:
    """Per-tenant accuracy (all tenants' test rows pooled) of each way of scoring in ``SCORES``."""
    y_train, y_test = torch.tensor(splits.train.labels), torch.tensor(splits.test.labels)
    classes = splits.num_classes
    everyone = torch.bincount(y_train, minlength=classes).float()
    log_all = torch.log(everyone / everyone.sum())
    correct = dict.fromkeys(SCORES, 0)
    with torch.no_grad():
        for model, train_rows, test_rows in zip(models, splits.train_rows, splits.test_rows):
            counts = torch.bincount(y_train[train_rows], minlength=classes).float()
            log_own = log_label_frequencies(y_train[train_rows], classes)
            mask = torch.where(counts > 0, 0.0, float("-inf"))
            logp = torch.log_softmax(model(feats["test"][test_rows]), 1)
            truth = y_test[test_rows]
            for name, shift in zip(SCORES, (0.0, mask, log_own, log_own - log_all)):
                correct[name] += int(((logp + shift).argmax(1) == truth).sum())
    total = sum(len(r) for r in splits.test_rows)
    return {name: count / total for name, count in correct.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_feature_arguments(parser)
    parser.add_argument("--rounds", default="3,6", help="comma-separated round counts")
    parser.add_argument("--share", nargs="+", default=["all", "none"], choices=["all", "none"])
    parser.add_argument("--final", nargs="+", default=["local"], choices=["local", "average"],
                        help="local: each tenant keeps its last round's copy (share = 'all'); average: "
                             "the last round is averaged too")
    parser.add_argument("--offset", action="store_true",
                        help="train with the tenant's log label frequencies added to its logits")
    parser.add_argument("--lr", type=float, default=0.5, help="the classifier's learning rate (lr_classifier)")
    args = parser.parse_args()
    splits, feats = features_from_arguments(args)
    print("| share | final | rounds | " + " | ".join(SCORES) + " | s |")
    print("|---|---|---:|" + "---:|" * (len(SCORES) + 1))
    for share in args.share:
        for final in (args.final if share == "all" else ["local"]):
            for rounds in (int(r) for r in args.rounds.split(",")):
                started = time.perf_counter()
                result = scores(splits, feats, train(splits, feats, rounds, share == "all", final, args.lr, args.seed,
                                                      args.offset))
                print(f"| {share} | {final if share == 'all' else '-'} | {rounds} | "
                      + " | ".join(f"{result[name]:.2%}" for name in SCORES)
                      + f" | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
