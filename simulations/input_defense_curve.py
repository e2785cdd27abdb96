"""Input defenses against token recovery at the cut (issue 14): a privacy/accuracy curve by proxies.

Today the head starts as the identity, so the cloud sees the public embedding output ``e`` and
recovers every token by nearest-neighbour lookup (docs/PRIVACY.md). Two candidate defenses,
measured without split training:

A. noise at the cut: the cloud sees ``e + N(0, sigma^2 I)`` (``--noise``);
B. client-side blocks: the tenant also runs the first ``k`` layers of the public body, and the
   cloud sees ``h_k + N(0, sigma^2 I)`` (``--client-layers`` x ``--client-noise``).

For every setting, on Banking77 test texts:

* token recovery (exact, real non-special tokens) on ``--attack-rows`` of them, by
  ``nearest_token`` (the audit's attack: each row to the nearest public embedding at its
  position); for ``k = 0`` ``posterior`` (the Bayes decoder: the attacker knows the noise and
  takes a unigram prior, add-one smoothed, from public text); for ``k > 0`` ``mapped_nearest``
  (a ridge map view -> ``e`` fitted on public text, then the nearest token); and the audit's
  ``ridge_inverter`` and ``mlp_inverter`` trained on public SST-2 text pushed through the same
  public computation with the same noise (the MLP only where the others stay below
  ``--mlp-below``: it costs a minute a setting);
* utility proxy: a multinomial logistic-regression probe on the mean-pooled output of the rest
  of the frozen body run on the defended view, trained on Banking77 training rows (its L2
  weight picked on a held-out fifth). A proxy: a real split run trains a head and a tail.

Writes ``OUT/results.json``, ``OUT/table.md`` and the plot (``--plot``).

    nice -n 10 python simulations/input_defense_curve.py     # MiniLM, the documented run
    python simulations/input_defense_curve.py --model tiny --train-rows 200 --test-rows 100 \\
        --public-sentences 200 --noise 0 1 --client-layers 1 --client-noise 0 --out /tmp/idc --plot /tmp/idc.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr
from tqdm.auto import tqdm

from flower_split.audit import StepView
from flower_split.audit.inversion import MlpInverter, NearestTokenAttack, RidgeInverter
from flower_split.audit.vocabulary import VocabularyTable
from flower_split.data import load_dataset
from flower_split.model import load_encoder, load_tokenizer, split_encoder

ATTACKS = ("nearest_token", "posterior", "mapped_nearest", "ridge_inverter", "mlp_inverter")


@dataclass
class Corpus:
    """One text set as token batches sorted by length (little padding); labels in batch order."""

    ids: list[torch.Tensor]
    masks: list[torch.Tensor]
    labels: torch.Tensor

    def rows(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The rows of per-batch tensors [B, T, ...] at real (unmasked) positions, concatenated."""
        return torch.cat([t[m] for t, m in zip(tensors, self.masks)])


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int, batch_size: int = 64) -> Corpus:
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches, masks = [], []
    for start in range(0, len(order), batch_size):
        chunk = [torch.as_tensor(ids[i]) for i in order[start:start + batch_size]]
        batches.append(pad_sequence(chunk, batch_first=True, padding_value=tokenizer.pad_token_id))
        masks.append(pad_sequence([torch.ones(len(c), dtype=torch.bool) for c in chunk], batch_first=True))
    return Corpus(batches, masks, torch.as_tensor([labels[i] for i in order], dtype=torch.long))


class Blocks:
    """The public body's transformer layers, run over any range ``[start, stop)`` from given
    hidden states (the body's embedding layer is a pass-through, see ``split_encoder``)."""

    def __init__(self, body) -> None:
        self.model = body.encoder
        self.layers = self.model.encoder.layer
        self.count = len(self.layers)

    @torch.no_grad()
    def run(self, h: torch.Tensor, mask: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        stop = self.count if stop is None else stop
        if start == stop:
            return h
        self.model.encoder.layer = self.layers[start:stop]
        try:
            return self.model(inputs_embeds=h, attention_mask=mask.long()).last_hidden_state
        finally:
            self.model.encoder.layer = self.layers


def clean_states(embedder, blocks: Blocks, corpus: Corpus, ks: list[int], final: bool) -> dict:
    """``{k: [h_k per batch]}`` for every ``k`` in ``ks`` (``h_0 = e``), plus ``"final"``: the
    mean-pooled body output [N, d] when ``final``. One pass through the layers."""
    out: dict = {k: [] for k in ks}
    pooled = []
    with torch.no_grad():
        for ids, mask in zip(corpus.ids, corpus.masks):
            h, done = embedder(ids), 0
            for k in sorted(ks):
                h, done = blocks.run(h, mask, done, k), k
                out[k].append(h)
            if final:
                pooled.append(masked_mean(blocks.run(h, mask, done), mask))
    if final:
        out["final"] = torch.cat(pooled)
    return out


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(h.dtype)
    return (h * weights).sum(1) / weights.sum(1).clamp_min(1)


def noisy(states: list[torch.Tensor], sigma: float, generator: torch.Generator) -> list[torch.Tensor]:
    """The cloud's view: every row (padding included) plus ``N(0, sigma^2 I)``. The simulation
    seeds torch's generator; a deployment would draw from a CSPRNG."""
    if sigma == 0:
        return states
    return [h + sigma * torch.randn(h.shape, generator=generator) for h in states]


def pooled_output(blocks: Blocks, views: list[torch.Tensor], corpus: Corpus, start: int) -> torch.Tensor:
    return torch.cat([masked_mean(blocks.run(v, m, start), m) for v, m in zip(views, corpus.masks)])


@torch.no_grad()
def decode(table: VocabularyTable, rows: torch.Tensor, positions: torch.Tensor,
           log_prior: torch.Tensor | None = None, variance: float = 0.0, chunk: int = 2048) -> torch.Tensor:
    """Per row, ``argmax_v 2 x.e(v,p) - |e(v,p)|^2 + 2 variance log prior(v)``: the nearest
    token at the row's position without a prior, the posterior mode of ``x = e(v,p) + N(0,
    variance I)`` with one."""
    out = torch.empty(len(rows), dtype=torch.long)
    bias = 0.0 if log_prior is None or variance == 0 else 2 * variance * log_prior
    for position in positions.unique().tolist():
        where = (positions == position).nonzero().squeeze(1)
        codebook, norms = table.at(int(position))
        offset = bias - norms
        for start in range(0, len(where), chunk):
            pick = where[start:start + chunk]
            out[pick] = (2 * rows[pick] @ codebook.T + offset).argmax(1)
    return out


def ridge_map(x: torch.Tensor, y: torch.Tensor, alpha: float = 1e-3) -> torch.Tensor:
    """Ridge regression ``[x, 1] -> y`` in closed form (float64): the attacker's map from its
    view of public text back to the public embedding output ``e``."""
    xb = F.pad(x.double(), (0, 1), value=1.0)
    gram = xb.T @ xb
    ridge = alpha * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, xb.T @ y.double()).float()


def unigram_log_prior(public: Corpus, vocab_size: int) -> torch.Tensor:
    counts = torch.bincount(public.rows(public.ids), minlength=vocab_size).double() + 1.0
    return (counts / counts.sum()).log().float()


@dataclass
class Context:
    """Everything a setting needs that does not depend on it."""

    blocks: Blocks
    table: VocabularyTable
    special: torch.Tensor  # special token ids
    log_prior: torch.Tensor
    corpora: dict  # "train", "test", "public" -> Corpus
    states: dict  # same keys -> clean_states
    classes: int
    args: argparse.Namespace


def attack(ctx: Context, k: int, sigma: float, views: list[torch.Tensor],
           public_views: list[torch.Tensor]) -> dict[str, float]:
    """Token recovery of every attack on the cloud's view of the attacked test texts."""
    target, public = ctx.corpora["attack"], ctx.corpora["public"]
    truth = target.rows(target.ids)
    scored = ~torch.isin(truth, ctx.special)
    positions = target.rows([torch.arange(m.shape[1]).expand_as(m) for m in target.masks])
    rows = target.rows(views)
    steps = [StepView("tenant", i, False, f=v, attention_mask=m.long()) for i, (v, m) in enumerate(zip(views,
                                                                                                      target.masks))]
    guesses = {"nearest_token": target.rows(NearestTokenAttack(ctx.table).guess(steps).ids)}
    if k == 0:
        guesses["posterior"] = decode(ctx.table, rows, positions, ctx.log_prior, sigma ** 2)
    else:
        weight = ridge_map(public.rows(public_views), public.rows(ctx.states["public"][0]))
        guesses["mapped_nearest"] = decode(ctx.table, F.pad(rows, (0, 1), value=1.0) @ weight, positions)
    train_rows, targets = public.rows(public_views), public.rows(public.ids)
    def rates() -> dict[str, float]:
        return {name: float((guess[scored] == truth[scored]).float().mean()) for name, guess in guesses.items()}

    for inverter in (RidgeInverter(), MlpInverter(seed=ctx.args.seed)):
        if inverter.name == "mlp_inverter" and max(rates().values()) >= ctx.args.mlp_below:
            break  # the cheaper attacks already recover enough: the setting fails whatever the MLP does
        started = time.perf_counter()
        guesses[inverter.name] = target.rows(inverter.fit(train_rows, targets).guess(steps).ids)
        tqdm.write(f"  {inverter.name}: {time.perf_counter() - started:.0f} s")
    return rates()


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   classes: int, seed: int) -> float:
    """Multinomial logistic regression (standardised features, L-BFGS); its L2 weight is the
    best of three on a held-out fifth of the training rows, then refitted on all of them."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    held, fit = order[:len(order) // 5], order[len(order) // 5:]
    scores = {l2: _accuracy(_logistic(train_x[fit], train_y[fit], classes, l2), train_x[held], train_y[held])
              for l2 in (1e-4, 1e-3, 1e-2)}
    best = max(scores, key=scores.get)
    return _accuracy(_logistic(train_x, train_y, classes, best), test_x, test_y)


def _logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    weight = torch.zeros(x.shape[1] + 1, classes, requires_grad=True)
    xb = F.pad(x, (0, 1), value=1.0)
    optimizer = torch.optim.LBFGS([weight], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(xb @ weight, y) + 0.5 * l2 * weight[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def _accuracy(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((F.pad(x, (0, 1), value=1.0) @ weight).argmax(1) == y).float().mean())


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon of a mu-GDP mechanism at ``delta`` (Dong, Roth & Su: delta(eps) =
    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2))."""
    def excess(eps: float) -> float:
        return ndtr(-eps / mu + mu / 2) - math.exp(eps + log_ndtr(-eps / mu - mu / 2)) - delta
    return 0.0 if excess(0.0) <= 0 else float(brentq(excess, 0.0, 10 * mu * mu + 50))


@torch.no_grad()
def geometry(table: VocabularyTable, special: torch.Tensor, seed: int, sample: int = 2000) -> dict:
    """Norms of ``e(v, 1)`` over the vocabulary and, for a sample of tokens, the distance to the
    nearest other token's embedding at the same position (p10 / p50 / p90)."""
    codebook, norms = table.at(1)
    candidates = torch.nonzero(~torch.isin(torch.arange(len(codebook)), special)).squeeze(1)
    pick = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:sample]]
    squared = (norms[pick, None] - 2 * codebook[pick] @ codebook.T + norms[None]).clamp_min(0)
    squared[torch.arange(len(pick)), pick] = float("inf")
    nearest = squared.min(1).values.sqrt()
    p10, p50, p90 = (float(nearest.quantile(q)) for q in (0.1, 0.5, 0.9))
    return {"mean_norm": float(norms.sqrt().mean()), "max_norm": float(norms.sqrt().max()),
            "nearest_p10": p10, "nearest_p50": p50, "nearest_p90": p90, "sampled_tokens": len(pick)}


def gdp_view(sigma: float, geo: dict, delta: float = 1e-5) -> dict | None:
    """Per token, between two tokens at embedding distance D, the view ``e + N(0, sigma^2 I)``
    is (D / sigma)-GDP: at the median nearest-neighbour distance and at the bound 2 max|e|."""
    if sigma == 0:
        return None
    out = {}
    for name, distance in (("nearest_p50", geo["nearest_p50"]), ("any_pair", 2 * geo["max_norm"])):
        mu = distance / sigma
        out[name] = {"distance": distance, "mu": mu, "epsilon_at_delta": gdp_epsilon(mu, delta)}
    return {"delta": delta, **out}


def run_setting(ctx: Context, k: int, sigma: float, index: int) -> dict:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(ctx.args.seed * 1000 + index)
    views = {name: noisy(ctx.states[name][k], sigma, generator) for name in ("train", "test", "attack", "public")}
    if sigma == 0:
        features = {name: ctx.states[name]["final"] for name in ("train", "test")}
    else:
        features = {name: pooled_output(ctx.blocks, views[name], ctx.corpora[name], k) for name in ("train", "test")}
    train, test = ctx.corpora["train"], ctx.corpora["test"]
    accuracy = probe_accuracy(features["train"], train.labels, features["test"], test.labels, ctx.classes,
                              ctx.args.seed)
    recovery = attack(ctx, k, sigma, views["attack"], views["public"])
    signal = float(test.rows(ctx.states["test"][k]).norm(dim=1).mean())
    width = ctx.states["test"][k][0].shape[-1]
    return {"defense": "noise at the cut" if k == 0 else "client-side blocks", "client_layers": k, "sigma": sigma,
            "signal_norm": signal, "noise_to_signal": sigma * math.sqrt(width) / signal,
            "recovery": recovery, "best_recovery": max(recovery.values()), "probe_accuracy": accuracy,
            "seconds": time.perf_counter() - started}


def build_context(args: argparse.Namespace, ks: list[int]) -> Context:
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    embedder, body = split_encoder(load_encoder(args.model, seed=args.seed))
    train_set, test_set = load_dataset("banking77", args.data_dir)
    public_set = load_dataset("sst2", args.public_dir)[0]
    corpora = {}
    for name, data, count in (("train", train_set, args.train_rows), ("test", test_set, args.test_rows),
                              ("attack", test_set, min(args.attack_rows, args.test_rows)),
                              ("public", public_set, args.public_sentences)):  # "attack": the first test rows
        pick = torch.randperm(len(data.texts), generator=torch.Generator().manual_seed(args.seed))[:count].tolist()
        corpora[name] = encode(tokenizer, [data.texts[i] for i in pick], [data.labels[i] for i in pick],
                               args.max_length)
    blocks, table = Blocks(body), VocabularyTable(embedder, cache_bytes=6 << 30)  # every position kept
    states = {name: clean_states(embedder, blocks, corpus, ks, final=name in ("train", "test"))
              for name, corpus in tqdm(corpora.items(), desc="clean forward passes")}
    special = torch.as_tensor(sorted(tokenizer.all_special_ids))
    return Context(blocks, table, special, unigram_log_prior(corpora["public"], table.vocab_size),
                   corpora, states, train_set.num_classes, args)


def plot(points: list[dict], undefended: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for k in sorted({p["client_layers"] for p in points}):
        family = [p for p in points if p["client_layers"] == k]
        label = "A: noise on e" if k == 0 else f"B: {k} client block{'s' if k > 1 else ''} (+ noise)"
        left.plot([100 * p["probe_accuracy"] for p in family], [100 * p["best_recovery"] for p in family], "o-",
                  label=label)
        for p in family:
            left.annotate(f"σ={p['sigma']:g}", (100 * p["probe_accuracy"], 100 * p["best_recovery"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
        noisy_points = [p for p in family if p["sigma"] > 0]
        right.plot([p["noise_to_signal"] for p in noisy_points], [100 * p["best_recovery"] for p in noisy_points],
                   "o-", label=f"{label}: best recovery")
        right.plot([p["noise_to_signal"] for p in noisy_points], [100 * p["probe_accuracy"] for p in noisy_points],
                   "s--", label=f"{label}: probe accuracy")
    left.axhline(20, color="grey", lw=0.8, ls=":")
    left.axvline(100 * undefended - 3, color="grey", lw=0.8, ls=":")
    left.set(xlabel="probe accuracy on Banking77 test (%)", ylabel="token recovery, best attack (%)",
             title="privacy / accuracy (target: lower right of the dotted lines)")
    right.set(xscale="log", xlabel="noise-to-signal norm ratio  σ√d / mean |row|", ylabel="%",
              title="recovery and accuracy against noise")
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(points: list[dict], undefended: float) -> str:
    lines = ["| setting | sigma | noise/signal | " + " | ".join(ATTACKS) + " | best | probe accuracy |",
             "|---|---:|---:|" + "---:|" * (len(ATTACKS) + 2)]
    for p in points:
        name = "A: e + noise" if p["client_layers"] == 0 else f"B: h_{p['client_layers']} + noise"
        cells = [f"{100 * p['recovery'][a]:.1f} %" if a in p["recovery"] else "-" for a in ATTACKS]
        lines.append(f"| {name} | {p['sigma']:g} | {p['noise_to_signal']:.2f} | " + " | ".join(cells)
                     + f" | {100 * p['best_recovery']:.1f} % | {100 * p['probe_accuracy']:.1f} % |")
    lines.append(f"\nUndefended probe accuracy {100 * undefended:.1f} %.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--out", default="docs/results/issue14-input-defense")
    parser.add_argument("--plot", default="docs/input_defense_curve.png")
    parser.add_argument("--noise", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2, 4, 8, 16])
    parser.add_argument("--client-layers", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--client-noise", type=float, nargs="*", default=[0, 0.5, 2])
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--attack-rows", type=int, default=500, help="test texts the token attacks run on")
    parser.add_argument("--public-sentences", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--data-dir", default=None, help="Banking77 directory (default: the packaged copy)")
    parser.add_argument("--public-dir", default=None, help="SST-2 directory (default: ../shared/data/sst2)")
    parser.add_argument("--mlp-below", type=float, default=0.9,
                        help="run the MLP inverter (the slowest attack) only where the others recover less than "
                             "this fraction (0: never, 1.01: always)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared machine more contend)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def summary(ctx: Context, geo: dict, points: list[dict]) -> dict:
    """The results file: the points, the undefended accuracy and what bounds the token attacks."""
    undefended = next((p["probe_accuracy"] for p in points if p["sigma"] == 0), None)
    if undefended is None:
        undefended = probe_accuracy(ctx.states["train"]["final"], ctx.corpora["train"].labels,
                                    ctx.states["test"]["final"], ctx.corpora["test"].labels, ctx.classes, ctx.args.seed)
    target, public = ctx.corpora["attack"], ctx.corpora["public"]
    truth = target.rows(target.ids)
    truth = truth[~torch.isin(truth, ctx.special)]
    return {"format": "flower-split-input-defense/1", "config": vars(ctx.args),
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": ctx.args.threads},
            "scored_tokens": len(truth),
            "public_coverage": float(torch.isin(truth, public.rows(public.ids)).float().mean()),
            "majority_token": float((truth == truth.mode().values).float().mean()), "geometry": geo,
            "undefended_probe_accuracy": undefended, "points": points}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = [(0, s) for s in args.noise] + [(k, s) for k in args.client_layers for s in args.client_noise]
    ctx = build_context(args, sorted({k for k, _ in settings}))
    geo = geometry(ctx.table, ctx.special, args.seed)
    points = []
    for index, (k, sigma) in enumerate(tqdm(settings, desc="settings")):
        point = run_setting(ctx, k, sigma, index)
        point["gdp"] = gdp_view(sigma, geo) if k == 0 else None
        points.append(point)
        tqdm.write(f"k={k} sigma={sigma:g}: recovery {point['recovery']}, probe {point['probe_accuracy']:.3f}")
    report = summary(ctx, geo, points)
    undefended = report["undefended_probe_accuracy"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table(points, undefended))
    plot(points, undefended, Path(args.plot))
    print(table(points, undefended))
    return report


if __name__ == "__main__":
    main()
