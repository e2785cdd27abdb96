"""Label-DP privacy curve: label recovery from ``dL/dh`` and test accuracy against epsilon.

For each noise multiplier ``sigma`` (or, with ``--rr``, each randomized-response epsilon:
``label_rr_epsilon``, labels drawn once, pure epsilon) it trains one split run in process while
recording what the cloud sees, scores the audit's label
attacks on the pooled ``dL/dh`` (``nearest_centroid_k1`` / ``_k5``, ``kmeans_hungarian``: the
``grad_h`` leak point of ``flower-split train --audit``, the same code, without the token
attacks on ``f`` that label-DP does not address), and writes into ``OUT``:

* ``sigma-<s>.json`` — one point: the run's results (accuracy, ``label_dp_epsilon``, ...) and
  the ``grad_h`` audit; an existing point is reused (``--fresh`` reruns it);
* ``curve.json`` and ``curve.md`` — all points, as a table;
* ``curve.png`` — label recovery and test accuracy against epsilon (sigma = 0 at "no DP").

    nice -n 10 python simulations/privacy_curve.py --out runs/privacy_curve \\
        --set max_train_samples=1280 --set max_test_samples=640 --set epochs=2 --set device=cpu
    python simulations/privacy_curve.py --out /tmp/curve --sigmas 0 4 --set quick=true   # tiny model
    nice -n 10 python simulations/privacy_curve.py --out runs/rr_curve --rr 2 4 6 \
        --set max_train_samples=1280 --set max_test_samples=640 --set epochs=2 --set device=cpu
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from flower_split.api import train
from flower_split.audit import CloudViewRecorder
from flower_split.audit.labels import KMeansAttack, NearestCentroidAttack, pooled_gradients
from flower_split.audit.report import score_labels
from flower_split.config import QUICK, RunConfig, parse_set

ATTACKS = ("nearest_centroid_k1", "nearest_centroid_k5", "kmeans_hungarian")


class LabelViewRecorder(CloudViewRecorder):
    """Records what the label attacks need (``dL/dh``, masks, labels) and drops ``f``, which
    is large (``B x T x d`` per step) and not label-dependent."""

    def record_f(self, tenant: str, step: int, f: torch.Tensor, attention_mask: torch.Tensor,
                 train: bool) -> None:
        super().record_f(tenant, step, f[..., :1], attention_mask, train)


def run_point(values: dict[str, object], sigma: float, rr: float = 0.0) -> dict:
    """Train with ``label_dp_noise = sigma`` (or ``label_rr_epsilon = rr``) and audit the
    cloud's ``dL/dh``: one curve point. Its ``epsilon``: the run's, None without label-DP."""
    config = RunConfig.from_mapping({**values, "label_dp_noise": sigma, "label_rr_epsilon": rr})
    recorder = LabelViewRecorder()
    started = time.perf_counter()
    run = train(config, progress=False, recorder=recorder)
    transcript = recorder.transcript()
    grads, labels = pooled_gradients(transcript.views, transcript.truth)
    classes = int(transcript.meta["num_classes"])
    attacks = [NearestCentroidAttack(1), NearestCentroidAttack(5), KMeansAttack(classes)]
    return {"sigma": sigma, "rr": rr, "config": config.to_dict(), "seconds": time.perf_counter() - started,
            "epsilon": rr or run["label_dp_epsilon"], "mechanism": "randomized response" if rr else "gaussian",
            "test_accuracy": run["test_accuracy"], "label_dp_epsilon": run["label_dp_epsilon"],
            "label_dp_uses": run.get("label_dp_uses", 0), "grad_h": score_labels(grads, labels, classes, attacks)}


def table(points: list[dict]) -> str:
    """The curve as a Markdown table (recoveries and accuracy in percent)."""
    lines = ["| mechanism | sigma | epsilon | " + " | ".join(ATTACKS) + " | test accuracy |",
             "|---|---:|---:|" + "---:|" * (len(ATTACKS) + 1)]
    for p in points:
        eps = _epsilon(p)
        shown = "inf (off)" if eps is None or math.isinf(eps) else f"{eps:.2f}"
        recoveries = [f"{100 * p['grad_h']['attacks'][a]['recovery']:.1f} %" for a in ATTACKS]
        mechanism = p.get("mechanism", "gaussian") if eps is not None else "none"
        lines.append(f"| {mechanism} | {p['sigma']:g} | {shown} | " + " | ".join(recoveries)
                     + f" | {100 * p['test_accuracy']:.1f} % |")
    chance = points[0]["grad_h"]
    lines.append(f"\nChance {100 * chance['chance']:.1f} %, majority class {100 * chance['majority']:.1f} % "
                 f"({chance['examples']} training examples).")
    return "\n".join(lines)


def _epsilon(point: dict) -> float | None:
    return point.get("epsilon", point["label_dp_epsilon"])


def plot(points: list[dict], path: Path) -> None:
    """Recovery of each attack and test accuracy against epsilon (log scale; no DP at the right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [_epsilon(p) for p in points if _epsilon(p) not in (None, math.inf)]
    off = 10 * max(finite) if finite else 1.0
    xs = [off if _epsilon(p) in (None, math.inf) else _epsilon(p) for p in points]
    order = sorted(range(len(points)), key=lambda i: xs[i])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for attack in ATTACKS:
        ax.plot([xs[i] for i in order], [100 * points[i]["grad_h"]["attacks"][attack]["recovery"] for i in order],
                marker="o", label=f"label recovery: {attack}")
    ax.plot([xs[i] for i in order], [100 * points[i]["test_accuracy"] for i in order], marker="s", color="black",
            label="test accuracy")
    ax.axhline(100 * points[0]["grad_h"]["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:.2g}" if x != off else "no DP" for x in xs], minor=False)
    rr = any(p.get("rr") for p in points)
    ax.set_xlabel("randomized-response epsilon (pure)" if rr else
                  f"label-DP epsilon (delta = {points[0]['config']['label_dp_delta']:g})")
    ax.set_ylabel("%")
    ax.set_title(("Randomized response on the labels" if rr else "Label-DP on dL/dz")
                 + ": what the cloud recovers from dL/dh")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--rr", type=float, nargs="+", default=None,
                        help="randomized-response epsilons instead of sigmas (0: no label-DP)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="RunConfig field (repeatable); quick=true: the tiny model's quick settings")
    parser.add_argument("--fresh", action="store_true", help="rerun points that already have a file")
    args = parser.parse_args()
    values = parse_set(args.set)
    if values.pop("quick", False):
        values = {**QUICK, **values}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    grid = [(0.0, rr) for rr in args.rr] if args.rr else [(sigma, 0.0) for sigma in args.sigmas]
    for sigma, rr in grid:
        path = out / (f"rr-{rr:g}.json" if args.rr else f"sigma-{sigma:g}.json")
        if path.exists() and not args.fresh:
            points.append(json.loads(path.read_text()))
            continue
        point = run_point(values, sigma, rr)
        point["machine"] = f"{platform.node()}: {platform.processor() or platform.machine()}, " \
                           f"{torch.get_num_threads()} torch threads"
        path.write_text(json.dumps(point, indent=2))
        points.append(point)
        print(f"sigma {sigma:g} rr {rr:g}: epsilon {point['epsilon']}, accuracy {point['test_accuracy']:.3f}, "
              + ", ".join(f"{a} {point['grad_h']['attacks'][a]['recovery']:.3f}" for a in ATTACKS), flush=True)
    (out / "curve.json").write_text(json.dumps(points, indent=2))
    (out / "curve.md").write_text(table(points) + "\n")
    plot(points, out / "curve.png")
    print(table(points))


if __name__ == "__main__":
    main()
