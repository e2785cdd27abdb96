"""Linear probes on the frozen body, per tenant: what a tenant reaches with its own rows, or with everyone's.

Reference points for the federated comparison, without Flower or 2PC:

* ``own``: a multinomial logistic regression on the frozen body's mean-pooled output (the split
  model's tail input at initialisation), trained on the tenant's rows alone;
* ``pooled``: the same probe trained on all tenants' rows (the centralized data), tested on
  each tenant's split;
* ``pooled+prior``: the pooled probe with its logits restricted to the classes the tenant
  trains on (what a tenant could add locally to a shared model: its own label set).

Features are standardised with the mean and spread of all training rows (as the probes of
``simulations/tenant_ceiling.py`` always were). Each probe's L2 strength is chosen on a held-out
fifth of its training rows, then refit on all of them.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flower_split.config import RunConfig
from flower_split.data import TokenizedDataset
from flower_split.data.tenants import TenantSplits, tenant_splits
from flower_split.model import load_encoder, load_tokenizer, masked_mean, split_encoder
from flower_split.protocol.optim import make_optimizer, warmup_cosine
from flower_split.train.metrics import macro_f1

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
PROBES = ("own", "pooled", "pooled+prior")


@torch.no_grad()
def pooled_features(model: str, dataset: TokenizedDataset, batch_size: int = 64, progress: bool = True,
                    seed: int = 0) -> torch.Tensor:
    """Mean-pooled frozen body output ``[rows, dim]`` (no adapters: identity head)."""
    embedder, body = split_encoder(load_encoder(model, seed=seed))
    out = []
    for batch in tqdm(dataset.batches(batch_size, shuffle=False), total=-(-len(dataset) // batch_size),
                      desc="features", leave=False, disable=not progress):
        h = body(embedder(batch.input_ids), batch.attention_mask)
        out.append(masked_mean(h, batch.attention_mask))
    return torch.cat(out) if out else torch.zeros(0, 0)


def cached_features(config: RunConfig, splits: TenantSplits, cache: Path) -> dict[str, torch.Tensor]:
    """:func:`pooled_features` of ``splits``' train and test rows, loaded from ``cache`` when it
    exists, else computed (minutes on a CPU for Banking77) and saved there."""
    if cache.exists():
        return torch.load(cache)
    tokenizer = load_tokenizer(config.model)
    feats = {name: pooled_features(config.model, TokenizedDataset(data, tokenizer, config.max_length))
             for name, data in (("train", splits.train), ("test", splits.test))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, cache)
    return feats


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a script that works on the frozen body's features of one tenant partitioning
    (``simulations/tenant_ceiling.py``, ``simulations/sharing_proxy.py``)."""
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cache", type=Path, default=Path("runs/tenant_ceiling_features.pt"),
                        help="features file (computed if missing; shared by the scripts that use it)")


def features_from_arguments(args: argparse.Namespace) -> tuple[TenantSplits, dict[str, torch.Tensor]]:
    """Banking77's tenant splits and their features for :func:`add_feature_arguments`' options."""
    torch.set_num_threads(args.threads)
    config = RunConfig.from_mapping({"model": args.model, "dataset": "banking77", "seed": args.seed}).validate()
    splits = tenant_splits(config, args.partition, args.num_clients)
    return splits, cached_features(config, splits, args.cache)


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
        scores.append(float((probe(x[held]).argmax(1) == y[held]).float().mean()) if len(held) else 0.0)
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


@dataclass
class ProbeScores:
    """One probe kind over every tenant: per-tenant correct counts, accuracy, macro-F1 and CPU."""

    correct: dict[str, int] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    macro_f1: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # fitting only (features apart)

    def weighted(self, test_rows: dict[str, int]) -> float | None:
        total = sum(test_rows.values())
        return sum(self.correct.values()) / total if total else None

    def weighted_f1(self, test_rows: dict[str, int]) -> float | None:
        total = sum(test_rows.values())
        return sum(self.macro_f1[t] * n for t, n in test_rows.items()) / total if total else None


@dataclass
class TenantProbes:
    """Every probe kind on every tenant's own test split."""

    scores: dict[str, ProbeScores]
    test_rows: dict[str, int]
    train_rows: dict[str, int]
    classes: dict[str, int]
    pooled_whole_test: float
    weight_decays: dict[str, float]


def standardised(features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test features standardised with the training rows' mean and spread."""
    mean, std = features["train"].mean(0), features["train"].std(0).clamp_min(1e-6)
    return (features["train"] - mean) / std, (features["test"] - mean) / std


def tenant_probes(splits: TenantSplits, features: dict[str, torch.Tensor], seed: int) -> TenantProbes:
    """Fit the ``own`` and ``pooled`` probes and score all three kinds on each tenant's test split."""
    x_train, x_test = standardised(features)
    y_train, y_test = torch.tensor(splits.train.labels), torch.tensor(splits.test.labels)
    classes = splits.num_classes
    started = time.process_time()
    pooled, pooled_wd = tuned_probe(x_train, y_train, classes, seed)
    pooled_cpu = time.process_time() - started
    tenants = [f"tenant-{k}" for k in range(len(splits.train_rows))]
    scores = {kind: ProbeScores() for kind in PROBES}
    result = TenantProbes(scores, {}, {}, {}, 0.0, {"pooled": pooled_wd})
    with torch.no_grad():
        result.pooled_whole_test = float((pooled(x_test).argmax(1) == y_test).float().mean())
    for tenant, tr, te in zip(tenants, splits.train_rows, splits.test_rows):
        tr, te = torch.tensor(tr, dtype=torch.long), torch.tensor(te, dtype=torch.long)
        own_classes = torch.unique(y_train[tr])
        started = time.process_time()
        own, result.weight_decays[tenant] = tuned_probe(x_train[tr], y_train[tr], classes, seed)
        own_cpu = time.process_time() - started
        with torch.no_grad():
            logits = pooled(x_test[te])
            prior = torch.full((classes,), float("-inf"))
            prior[own_classes] = 0.0
            predicted = {"own": own(x_test[te]).argmax(1), "pooled": logits.argmax(1),
                         "pooled+prior": (logits + prior).argmax(1)}
        for kind, guess in predicted.items():
            scores[kind].correct[tenant] = int((guess == y_test[te]).sum())
            scores[kind].accuracy[tenant] = scores[kind].correct[tenant] / len(te) if len(te) else 0.0
            scores[kind].macro_f1[tenant] = macro_f1(guess, y_test[te], classes)
            scores[kind].cpu_seconds[tenant] = own_cpu if kind == "own" else pooled_cpu / len(tenants)
        result.test_rows[tenant], result.train_rows[tenant] = len(te), len(tr)
        result.classes[tenant] = len(own_classes)
    return result
