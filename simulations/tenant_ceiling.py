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
of them. Features are computed once (``--cache``). ``--sgd-lrs`` also trains the ``own`` probe
the way the split trainer trains its classifier (SGD momentum 0.9, warm-up + cosine, batch 32,
``--epochs``, the raw features) at each learning rate: how much the classifier's learning rate
matters on these unnormalised features.

    python simulations/tenant_ceiling.py --num-clients 10 --partition dirichlet:0.5
    python simulations/tenant_ceiling.py --sgd-lrs 0.1,0.5,1.0 --epochs 3
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.data.tenants import tenant_splits
from flower_split.model import load_encoder, load_tokenizer, masked_mean, split_encoder
from flower_split.protocol.optim import make_optimizer, warmup_cosine

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)


@torch.no_grad()
def pooled_features(model: str, dataset: TokenizedDataset, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled frozen body output ``[rows, dim]`` (no adapters: identity head)."""
    embedder, body = split_encoder(load_encoder(model))
    out = []
    for batch in tqdm(dataset.batches(batch_size, shuffle=False), total=-(-len(dataset) // batch_size),
                      desc="features", leave=False):
        h = body(embedder(batch.input_ids), batch.attention_mask)
        out.append(masked_mean(h, batch.attention_mask))
    return torch.cat(out)


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
              steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression with an L2 penalty, fitted by full-batch L-BFGS."""
    probe = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def tuned_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> tuple[torch.nn.Linear, float]:
    """The probe whose weight decay scores best on a held-out fifth, refit on all rows."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    held, fit = order[: len(y) // 5], order[len(y) // 5:]
    scores = []
    for wd in WEIGHT_DECAYS:
        probe = fit_probe(x[fit], y[fit], num_classes, wd)
        scores.append(float((probe(x[held]).argmax(1) == y[held]).float().mean()))
    best = WEIGHT_DECAYS[max(range(len(scores)), key=scores.__getitem__)]
    return fit_probe(x, y, num_classes, best), best


def sgd_probe_accuracy(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                       num_classes: int, lr: float, epochs: int, seed: int, batch_size: int = 32) -> int:
    """Correct test predictions of a linear classifier trained like the split tail's classifier."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = make_optimizer("sgd", probe, lr, momentum=0.9, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, epochs * math.ceil(len(y) / batch_size), 0.06)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(probe(x[rows]), y[rows]).backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return int((probe(x_test).argmax(1) == y_test).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--sgd-lrs", default="", help="comma-separated SGD learning rates for the own-data probe")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the SGD probes")
    parser.add_argument("--cache", type=Path, default=Path("runs/tenant_ceiling_features.pt"),
                        help="features file (computed if missing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RunConfig.from_mapping({"model": args.model, "dataset": "banking77", "seed": args.seed}).validate()
    splits = tenant_splits(config, args.partition, args.num_clients)
    started = time.perf_counter()
    if args.cache.exists():
        feats = torch.load(args.cache)
    else:
        tokenizer = load_tokenizer(config.model)
        feats = {name: pooled_features(config.model, TokenizedDataset(data, tokenizer, config.max_length))
                 for name, data in (("train", splits.train), ("test", splits.test))}
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, args.cache)
    mean, std = feats["train"].mean(0), feats["train"].std(0).clamp_min(1e-6)
    x_train, x_test = (feats["train"] - mean) / std, (feats["test"] - mean) / std
    y_train, y_test = torch.tensor(splits.train.labels), torch.tensor(splits.test.labels)
    classes = splits.num_classes

    pooled, pooled_wd = tuned_probe(x_train, y_train, classes, args.seed)
    print(f"pooled probe (weight decay {pooled_wd:g}): whole test set "
          f"{float((pooled(x_test).argmax(1) == y_test).float().mean()):.4f}")
    totals = {"own": 0, "pooled": 0, "pooled+prior": 0}
    rows = 0
    print("| tenant | train rows | classes | own | pooled | pooled+prior |")
    print("|---:|---:|---:|---:|---:|---:|")
    tenants = [(torch.tensor(tr), torch.tensor(te)) for tr, te in zip(splits.train_rows, splits.test_rows)]
    for k, (tr, te) in enumerate(tenants):
        own_classes = torch.unique(y_train[tr])
        own, _ = tuned_probe(x_train[tr], y_train[tr], classes, args.seed)
        with torch.no_grad():
            logits = pooled(x_test[te])
            prior = torch.full((classes,), float("-inf"))
            prior[own_classes] = 0.0
            correct = {"own": int((own(x_test[te]).argmax(1) == y_test[te]).sum()),
                       "pooled": int((logits.argmax(1) == y_test[te]).sum()),
                       "pooled+prior": int(((logits + prior).argmax(1) == y_test[te]).sum())}
        for key, value in correct.items():
            totals[key] += value
        rows += len(te)
        print(f"| {k} | {len(tr)} | {len(own_classes)} | " +
              " | ".join(f"{correct[key] / len(te):.2%}" for key in totals) + " |", flush=True)
    print("| weighted | | | " + " | ".join(f"**{totals[key] / rows:.2%}**" for key in totals) + " |")
    for lr in (float(v) for v in args.sgd_lrs.split(",") if v):
        correct = sum(sgd_probe_accuracy(feats["train"][tr], y_train[tr], feats["test"][te], y_test[te],
                                         classes, lr, args.epochs, args.seed)
                      for tr, te in tenants)
        print(f"own-data SGD probe, lr {lr:g}, {args.epochs} epochs, raw features: {correct / rows:.2%} per tenant")
    print(f"{time.perf_counter() - started:.0f} s, {args.num_clients} tenants, {args.partition}, seed {args.seed}")


if __name__ == "__main__":
    main()
