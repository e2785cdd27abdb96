"""Input-noise privacy curve: token recovery from ``f`` and test accuracy against ``input_noise``.

For each sigma it trains one split run in process (head and tail train on the noisy
embeddings, as a tenant would) while recording the cloud's view, runs the whole audit
(``flower-split audit``: every token attack, noise-aware inverters trained on public SST-2
text pushed through the same noise, the label attacks) and writes into ``OUT``:

* ``sigma-<s>/results.json`` and ``sigma-<s>/audit.json`` — one point (the transcript is
  deleted after the audit unless ``--keep-transcripts``: about 6 MB per training step on MiniLM);
  an existing point is reused (``--fresh`` reruns it);
* ``curve.json``, ``curve.md`` (the table) and ``curve.png`` (recovery and accuracy against sigma).

    nice -n 10 python simulations/input_noise_curve.py --out runs/input_noise_curve --sigmas 0 0.5 1 2 \\
        --set max_train_samples=1280 --set max_test_samples=640 --set epochs=2 --set device=cpu
    python simulations/input_noise_curve.py --out /tmp/curve --sigmas 0 4 --set quick=true --public-data none
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from flower_split.api import train
from flower_split.audit import CloudViewRecorder, audit_directory
from flower_split.config import QUICK, RunConfig, parse_set

TOKEN_ATTACKS = ("nearest_token", "linked_average", "ridge_inverter", "mlp_inverter", "alignment_anchors", "alignment_known2")
LABEL_ATTACK = "nearest_centroid_k5"


def run_point(values: dict[str, object], sigma: float, directory: Path, public: str | None, keep: bool) -> dict:
    """Train with ``input_noise = sigma``, audit the recorded view; the point's summary."""
    config = RunConfig.from_mapping({**values, "input_noise": sigma})
    recorder = CloudViewRecorder()
    started = time.perf_counter()
    run = train(config, progress=True, recorder=recorder)
    seconds = time.perf_counter() - started
    directory.mkdir(parents=True, exist_ok=True)
    recorder.save(directory)
    (directory / "results.json").write_text(json.dumps(run, indent=2))
    audit = json.loads(audit_directory(directory, public=public).read_text())
    if not keep:
        for name in ("cloud_view.safetensors", "ground_truth.safetensors"):
            (directory / name).unlink(missing_ok=True)
    return summarise(sigma, run, audit, seconds)


def summarise(sigma: float, run: dict, audit: dict, seconds: float) -> dict:
    """One row of the curve: the guarantee, each token attack's recovery, the best, accuracy."""
    f = audit["leak_points"]["f"]
    tokens = {name: a["recovery"] for name, a in f["attacks"].items()}
    labels = audit["leak_points"]["grad_h"].get("attacks", {})
    return {"sigma": sigma, "mu": run.get("input_noise_mu"), "epsilon": run.get("input_noise_epsilon"),
            "delta": run.get("input_noise_delta"), "sensitivity": run.get("input_noise_sensitivity"),
            "test_accuracy": run["test_accuracy"], "tokens": tokens, "best_token_recovery": max(tokens.values()),
            "token_chance": f["chance"], "majority_token": f["majority"], "public_coverage": f.get("public_coverage"),
            "label_recovery_k5": labels.get(LABEL_ATTACK, {}).get("recovery"), "train_seconds": seconds,
            "config": run.get("config")}


def table(points: list[dict]) -> str:
    """The curve as a Markdown table (percent)."""
    head = "| sigma | mu per token | epsilon per token | " + " | ".join(TOKEN_ATTACKS) + \
           " | best | labels k5 | test accuracy |"
    lines = [head, "|" + "---:|" * (len(TOKEN_ATTACKS) + 6)]
    for p in points:
        guarantee = ("off", "-") if not p["sigma"] else (f"{p['mu']:.2f}", f"{p['epsilon']:.1f}")
        cells = [f"{100 * p['tokens'][a]:.1f} %" if a in p["tokens"] else "-" for a in TOKEN_ATTACKS]
        label = "-" if p["label_recovery_k5"] is None else f"{100 * p['label_recovery_k5']:.1f} %"
        lines.append(f"| {p['sigma']:g} | {guarantee[0]} | {guarantee[1]} | " + " | ".join(cells)
                     + f" | {100 * p['best_token_recovery']:.1f} % | {label} | {100 * p['test_accuracy']:.1f} % |")
    lines.append(f"\nToken chance {100 * points[0]['token_chance']:.3f} %, majority token "
                 f"{100 * points[0]['majority_token']:.1f} %; mu and epsilon (delta "
                 f"{points[-1]['delta'] or 1e-5:g}) for the worst pair of tokens at one position.")
    return "\n".join(lines)


def plot(points: list[dict], path: Path) -> None:
    """Best token recovery, each attack, and test accuracy against sigma."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(points, key=lambda p: p["sigma"])
    xs = [p["sigma"] for p in order]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for attack in TOKEN_ATTACKS:
        if all(attack in p["tokens"] for p in order):
            ax.plot(xs, [100 * p["tokens"][attack] for p in order], marker=".", linewidth=1, label=attack)
    ax.plot(xs, [100 * p["best_token_recovery"] for p in order], marker="o", color="red", label="best token attack")
    ax.plot(xs, [100 * p["test_accuracy"] for p in order], marker="s", color="black", label="test accuracy")
    ax.axhline(20, color="grey", linestyle=":", label="20 % recovery target")
    ax.set_xlabel("input_noise sigma (Gaussian on the embeddings, once per text)")
    ax.set_ylabel("%")
    ax.set_title("Input noise in split training: token recovery from f vs accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="RunConfig field (repeatable); quick=true: the tiny model's quick settings")
    parser.add_argument("--public-data", default="sst2", help="the inverters' public text; 'none' skips them")
    parser.add_argument("--keep-transcripts", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="rerun points that already have a file")
    args = parser.parse_args()
    values = parse_set(args.set)
    if values.pop("quick", False):
        values = {**QUICK, **values}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    public = None if args.public_data == "none" else args.public_data
    points = []
    for sigma in args.sigmas:
        path = out / f"sigma-{sigma:g}" / "point.json"
        if path.exists() and not args.fresh:
            points.append(json.loads(path.read_text()))
            continue
        point = run_point(values, sigma, path.parent, public, args.keep_transcripts)
        point["machine"] = f"{platform.node()}: {platform.processor() or platform.machine()}, " \
                           f"{torch.get_num_threads()} torch threads"
        path.write_text(json.dumps(point, indent=2))
        points.append(point)
        print(f"sigma {sigma:g}: accuracy {point['test_accuracy']:.3f}, best token recovery "
              f"{point['best_token_recovery']:.3f}, mu {point['mu']}", flush=True)
    (out / "curve.json").write_text(json.dumps(points, indent=2))
    (out / "curve.md").write_text(table(points) + "\n")
    plot(points, out / "curve.png")
    print(table(points))


if __name__ == "__main__":
    main()
