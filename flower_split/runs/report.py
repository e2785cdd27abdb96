"""The comparison's report: one markdown table (``report.md``) and two plots (PNG).

``accuracy_vs_round.png``: per-tenant (and global) test accuracy per round of every run;
``costs.png``: client CPU per sample and bytes per client and round.
"""

from __future__ import annotations

from pathlib import Path

from flower_split.runs.compare_spec import CompareSpec, resolve_local_steps

COLUMNS = ("run", "per-tenant accuracy", "per-tenant macro-F1", "global test accuracy", "global macro-F1",
           "wall time (s)",
           "client CPU s / sample", "client peak RSS (MB)", "bytes / client / round", "round trips / step",
           "Flower wait")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def table_row(run: dict) -> list[str]:
    federated = run.get("mode") == "federated"
    rss = run.get("client_peak_rss_bytes")
    growth = run.get("client_rss_above_baseline_bytes")
    return [
        run["name"],
        _pct(run.get("test_accuracy")) + ("" if federated else " ¹"),
        _pct(run.get("test_macro_f1")) + ("" if federated else " ¹"),
        _pct(run.get("global_test_accuracy")) + (" ³" if run.get("strategy") == "split" else ""),
        _pct(run.get("global_test_macro_f1")) + (" ³" if run.get("strategy") == "split" else ""),
        _num(run.get("wall_seconds"), ".1f"),
        _num(run.get("client_cpu_seconds_per_sample"), ".2e") + ("" if federated else " ²"),
        "n/a" if rss is None else f"{rss / 2**20:.0f}" + ("" if growth is None else f" (+{growth / 2**20:.0f})"),
        _bytes(run.get("bytes_per_client_per_round")),
        _num(run.get("round_trips_per_step"), ".3f"),
        _pct(run.get("flower_wait_fraction")),
    ]


def render_report(spec: CompareSpec, runs: list[dict], skipped: list[dict]) -> str:
    config = spec.base_config()
    lines = [
        "# flower-split comparison",
        "",
        f"Config `{spec.source}`: model `{config.model}`, dataset `{config.dataset}`, seed {config.seed}, "
        f"{spec.num_clients} tenants, partition `{spec.partition}`, {spec.rounds} rounds "
        f"(FedAvg: {spec.local_epochs} local epoch(s) per round; split: {resolve_local_steps(spec)} "
        f"micro-batches per tenant per round; centralized: {spec.centralized_epochs} epochs).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(table_row(run)) + " |" for run in runs]
    lines += [""]
    for item in skipped:
        lines.append(f"- **{item['name']}** not run: {item['reason']}")
    if skipped:
        lines.append("")
    lines += [
        "How each column is measured:",
        "",
        "- **per-tenant accuracy / macro-F1**: every tenant evaluates on its own test split (test rows dealt "
        "out with the label distribution of its training partition); example-weighted mean over tenants after "
        "the last round. Macro-F1 per tenant over the classes present in its split or its predictions. "
        "¹ Centralized: on the whole sampled test set (one model).",
        "- **global test accuracy / macro-F1**: on the whole sampled test set. Centralized and FedAvg: the one "
        "global model (FedAvg: evaluated by the ServerApp). ³ Split has no global model (each tenant has its "
        "own adapters): the plain mean over tenants of each tenant's adapters on the whole test set — it "
        "measures how far a tenant's model transfers beyond its own label distribution, not the headline.",
        "- **wall time**: centralized: training + evaluation. Federated: the ServerApp's rounds and "
        "evaluations after a warm-up message that started every client (Ray actors, imports, model and data "
        "loading: `startup_seconds` in results.json); all clients share this machine's cores.",
        "- **client CPU s / sample**: process CPU seconds (`time.process_time`, all threads) spent in "
        "client training handlers, over training samples processed (`torch_threads` per client in "
        "results.json says how many threads torch used there). Model loading and tokenization are excluded (`setup_cpu_seconds`). ² Centralized has no "
        "client: the trainer's CPU seconds (training and evaluation, `[compare] threads` torch threads) per sample.",
        "- **client peak RSS**: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the client process — a "
        "Ray actor that may serve several tenants in turn, with Python, torch, Flower and Ray loaded — "
        "maximum over tenants; in parentheses its growth above the actor's peak RSS at its first message "
        "(the client's own model, data and activations).",
        "- **bytes / client / round**: serialized ArrayRecord sizes (plus ConfigRecord `bytes` values) "
        "sent up plus down per tenant in a training round, mean over rounds; evaluation traffic excluded "
        "(it is in results.json as `eval_bytes_up/down`).",
        "- **round trips / step**: Flower round trips per optimizer step of a tenant in a training round "
        "(FedAvg: one train round trip per round over the mean local steps).",
        "- **Flower wait**: split only: share of the training rounds' wall time the ServerApp spent in "
        "`send_and_receive` (the rest is the cloud's own work and bookkeeping; n/a where not measured).",
        "",
        "Plots: `accuracy_vs_round.png` (per-tenant accuracy per round; FedAvg global-test accuracy dashed; "
        "centralized final accuracy as a horizontal line) and `costs.png`.",
        "",
    ]
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        if run.get("mode") == "federated":
            points = [(r["round"], r["test_accuracy"]) for r in run["rounds"] if r.get("test_accuracy") is not None]
            if points:
                line, = ax.plot(*zip(*points), marker="o", label=f"{run['name']} (per-tenant)")
                glob = [(r["round"], r["global_test_accuracy"]) for r in run["rounds"]
                        if r.get("global_test_accuracy") is not None]
                if glob:
                    ax.plot(*zip(*glob), linestyle="--", marker="x", color=line.get_color(),
                            label=f"{run['name']} (global test)")
        elif run.get("test_accuracy") is not None:
            ax.axhline(run["test_accuracy"], color="gray", linestyle=":", label=f"{run['name']} (final)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_round.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    metrics = [("client_cpu_seconds_per_sample", "client CPU s / sample", 1.0),
               ("bytes_per_client_per_round", "MB / client / round", 1e-6),
               ("client_peak_rss_bytes", "client peak RSS (MB)", 2**-20),
               ("wall_seconds", "wall time (s)", 1.0)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
    names = [run["name"] for run in runs]
    for ax, (key, label, scale) in zip(axes, metrics):
        values = [(run.get(key) or 0.0) * scale for run in runs]
        ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "costs.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
