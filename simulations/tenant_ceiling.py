"""How far can a tenant get on its own data? Linear probes on the frozen body, per tenant.

A split tenant's adapters are private and learn only from that tenant's rows. This measures
the accuracy such a model can reach on the tenant's own test split (the headline per-tenant
metric of a federated comparison) when knowledge is *not* shared, against a model that sees
every tenant's rows, without any Flower or 2PC cost:

* ``own``: a multinomial logistic regression on the frozen body's mean-pooled output
  (the split model's tail input at initialisation), trained on the tenant's rows alone;
* ``pooled``: the same probe trained on all tenants' rows (the centralized data), tested on
  each tenant's split;
* ``pooled+prior``: the pooled probe with its logits restricted to the classes the tenant
  trains on (what a tenant could add locally to a shared model: its own label set).

Each probe's L2 strength is chosen on a held-out fifth of its training rows, then refit on all
of them (the probes are :mod:`flower_split.train.probes`, which ``flower-split compare`` also runs
as the ``probes`` reference rows). Features are computed once (``--cache``). ``--sgd-lrs`` also trains the ``own`` probe
the way the split trainer trains its classifier (SGD momentum 0.9, warm-up + cosine, batch 32,
``--epochs``, the raw features) at each learning rate: how much the classifier's learning rate
matters on these unnormalised features.

    python simulations/tenant_ceiling.py --num-clients 10 --partition dirichlet:0.5
    python simulations/tenant_ceiling.py --sgd-lrs 0.1,0.5,1.0 --epochs 3
"""

from __future__ import annotations

import argparse
import time

import torch

from flower_split.train.probes import (
    PROBES, add_feature_arguments, features_from_arguments, sgd_probe_accuracy, tenant_probes,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_feature_arguments(parser)
    parser.add_argument("--sgd-lrs", default="", help="comma-separated SGD learning rates for the own-data probe")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the SGD probes")
    args = parser.parse_args()
    started = time.perf_counter()
    splits, feats = features_from_arguments(args)
    probes = tenant_probes(splits, feats, args.seed)
    print(f"pooled probe (weight decay {probes.weight_decays['pooled']:g}): whole test set "
          f"{probes.pooled_whole_test:.4f}")
    print("| tenant | train rows | classes | own | pooled | pooled+prior |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, tenant in enumerate(probes.test_rows):
        print(f"| {k} | {probes.train_rows[tenant]} | {probes.classes[tenant]} | " +
              " | ".join(f"{probes.scores[kind].accuracy[tenant]:.2%}" for kind in PROBES) + " |")
    print("| weighted | | | " + " | ".join(f"**{probes.scores[kind].weighted(probes.test_rows):.2%}**"
                                         for kind in PROBES) + " |")
    y_train, y_test = torch.tensor(splits.train.labels), torch.tensor(splits.test.labels)
    tenants = [(torch.tensor(tr), torch.tensor(te)) for tr, te in zip(splits.train_rows, splits.test_rows)]
    rows = sum(len(te) for _, te in tenants)
    for lr in (float(v) for v in args.sgd_lrs.split(",") if v):
        correct = sum(sgd_probe_accuracy(feats["train"][tr], y_train[tr], feats["test"][te], y_test[te],
                                         splits.num_classes, lr, args.epochs, args.seed)
                      for tr, te in tenants)
        print(f"own-data SGD probe, lr {lr:g}, {args.epochs} epochs, raw features: {correct / rows:.2%} per tenant")
    print(f"{time.perf_counter() - started:.0f} s, {args.num_clients} tenants, {args.partition}, seed {args.seed}")


if __name__ == "__main__":
    main()
