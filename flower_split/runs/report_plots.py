"""The comparison's plots (PNG, matplotlib; none, with a message, when matplotlib is missing).

``accuracy_vs_round.png``  per-tenant accuracy per round of every federated run (FedAvg's
                           global-test accuracy dashed; runs without rounds as horizontal lines);
``accuracy_vs_cpu.png``    per-tenant accuracy against cumulative client CPU seconds per tenant;
``per_tenant_<run>.png``   every tenant's accuracy per round of one federated run (its
                           personalised scores, if any, as stars after the last round);
``costs.png``              client CPU per sample, bytes per client and round, peak RSS, wall time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from flower_split.runs.report import curve, expand_runs


def _pyplot() -> Any | None:
    try:
        import matplotlib
    except ImportError:
        print("flower-split: matplotlib is not installed, so no plots (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(runs: list[dict], out: Path) -> list[Path]:
    """Write the plots of ``runs`` into ``out``; their paths (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = expand_runs(runs)
    paths = [_accuracy_vs_round(plt, rows, out / "accuracy_vs_round.png"),
             _accuracy_vs_cpu(plt, rows, out / "accuracy_vs_cpu.png")]
    for run in runs:
        if run.get("mode") == "federated" and any(r.get("per_tenant_accuracy") for r in run.get("rounds", [])):
            paths.append(_per_tenant(plt, run, out / f"per_tenant_{_slug(run['name'])}.png"))
    paths.append(_costs(plt, rows, out / "costs.png"))
    return paths


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(plt: Any, fig: Any, ax: Any, path: Path, title: str, xlabel: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    if xlabel == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("per-tenant test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy_vs_round(plt: Any, rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(rows):  # a run has the same colour in every plot
        points = curve(run)
        if run.get("mode") == "federated" and run.get("rounds") and points:
            line, = ax.plot([p[0] for p in points], [p[2] for p in points], marker="o", markersize=3,
                            color=f"C{i % 10}", label=run["name"])
            glob = [(r["round"], r["global_test_accuracy"]) for r in run["rounds"]
                    if r.get("global_test_accuracy") is not None]
            if glob:
                ax.plot(*zip(*glob), linestyle="--", marker="x", color=line.get_color(),
                        label=f"{run['name']} (global test)")
        elif run.get("test_accuracy") is not None:
            ax.axhline(run["test_accuracy"], linestyle=":", color=f"C{i % 10}", label=f"{run['name']} (final)")
    return _save(plt, fig, ax, path, "Accuracy vs round", "round")


def _accuracy_vs_cpu(plt: Any, rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(rows):
        points = [p for p in curve(run) if p[1] is not None and p[1] > 0]
        if points:
            ax.plot([p[1] for p in points], [p[2] for p in points], marker="o" if len(points) > 1 else "*",
                    markersize=3 if len(points) > 1 else 10, color=f"C{i % 10}", label=run["name"])
    ax.set_xscale("log")
    return _save(plt, fig, ax, path, "Accuracy vs client compute", "cumulative client CPU s per tenant")


def _per_tenant(plt: Any, run: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    rounds = [r for r in run["rounds"] if r.get("per_tenant_accuracy")]
    tenants = sorted({t for r in rounds for t in r["per_tenant_accuracy"]},
                     key=lambda t: (int(m.group(1)) if (m := re.search(r"(\d+)$", t)) else -1, t))
    personal = (run.get("personalized") or {}).get("per_tenant_accuracy") or {}
    last = rounds[-1]["round"] if rounds else 0
    for i, tenant in enumerate(tenants):
        points = [(r["round"], r["per_tenant_accuracy"][tenant]) for r in rounds if tenant in r["per_tenant_accuracy"]]
        color = f"C{i % 10}"
        ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=tenant)
        if tenant in personal:
            ax.plot([last + 0.5], [personal[tenant]], marker="*", markersize=10, color=color)
    weighted = [(r["round"], r["test_accuracy"]) for r in rounds if r.get("test_accuracy") is not None]
    if weighted:
        ax.plot(*zip(*weighted), color="black", linewidth=2.5, label="weighted mean")
    title = f"{run['name']}: per-tenant accuracy" + (" (stars: personalised)" if personal else "")
    return _save(plt, fig, ax, path, title, "round")


def _costs(plt: Any, rows: list[dict], path: Path) -> Path:
    metrics = [("client_cpu_seconds_per_tenant", "client CPU s / tenant", 1.0),
               ("client_cpu_seconds_per_sample", "client CPU s / sample", 1.0),
               ("bytes_per_client_per_round", "MB / client / round", 1e-6),
               ("client_peak_rss_bytes", "client peak RSS (MB)", 2**-20),
               ("wall_seconds", "wall time (s)", 1.0)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
    names = [run["name"] for run in rows]
    for ax, (key, label, scale) in zip(axes, metrics):
        values = [(run.get(key) or 0.0) * scale for run in rows]
        ax.bar(range(len(names)), values, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
