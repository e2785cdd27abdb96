"""The comparison's report (``report.md``): the main table, per-tenant scores, equal rounds, cost of accuracy.

Rows: every run of ``results.json``, and after each FedAvg-family run with personalisation its
personalised row (``<run>-personalized``, :func:`expand_runs`). The plots are
:mod:`flower_split.runs.report_plots`.
"""

from __future__ import annotations

import re

from flower_split.runs.compare_spec import CompareSpec, resolve_local_steps

COLUMNS = ("run", "per-tenant accuracy", "per-tenant macro-F1", "global test accuracy", "global macro-F1",
           "rounds", "wall time (s)", "client CPU s / tenant", "client CPU s / sample", "client peak RSS (MB)",
           "ServerApp peak RSS (MB)", "bytes / client / round", "round trips / step", "Flower wait")
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.93)


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


def expand_runs(runs: list[dict]) -> list[dict]:
    """Every run, each FedAvg-family run with personalisation followed by its personalised row.

    The personalised row has the run's fields overlaid with ``personalized`` (scores after the
    fine-tuning, costs of the rounds plus the fine-tuning) and no per-round curve.
    """
    rows = []
    for run in runs:
        rows.append(run)
        personal = run.get("personalized")
        if personal:
            rows.append({**{k: v for k, v in run.items() if k != "personalized"}, **personal,
                         "name": f"{run['name']}-personalized", "personalized_from": run["name"],
                         "global_test_accuracy": None, "global_test_macro_f1": None, "rounds": []})
    return rows


def curve(run: dict) -> list[tuple[int | None, float | None, float]]:
    """(round, cumulative client CPU s per tenant, per-tenant accuracy) of every evaluated point.

    A run without rounds (centralized, probes, a personalised row) is one point at its total cost.
    """
    tenants = max(1, int(run.get("num_clients") or 1))
    spent, points = 0.0, []
    for r in run.get("rounds") or []:
        spent += (r.get("client_cpu_seconds") or 0.0) / tenants
        if r.get("test_accuracy") is not None:
            points.append((r["round"], spent, r["test_accuracy"]))
    if not points and run.get("test_accuracy") is not None:
        return [(run.get("rounds_run"), run.get("client_cpu_seconds_per_tenant"), run["test_accuracy"])]
    return points


def _rounds_cell(run: dict) -> str:
    if run.get("personalized_from"):
        return f"{run.get('rounds_run')} + {run.get('epochs')} local ep."
    if run.get("mode") == "federated":
        cell = f"{run.get('rounds_run', len([r for r in run['rounds'] if r['round'] > 0]))}/{run['num_server_rounds']}"
        return cell + (" (plateau)" if run.get("plateau_stopped") else "")
    if run.get("mode") == "centralized":
        return f"{run['config']['epochs']} epochs"
    return "—"


def table_row(run: dict) -> list[str]:
    federated = run.get("mode") == "federated"
    pooled = run.get("mode") == "centralized" or run.get("name") == "probe-pooled"
    rss = run.get("client_peak_rss_bytes")
    growth = run.get("client_rss_above_baseline_bytes")
    per_tenant = federated or run.get("mode") == "reference"
    return [
        run["name"],
        _pct(run.get("test_accuracy")) + ("" if per_tenant else " ¹"),
        _pct(run.get("test_macro_f1")) + ("" if per_tenant else " ¹"),
        _pct(run.get("global_test_accuracy")) + (" ³" if run.get("strategy") == "split" else ""),
        _pct(run.get("global_test_macro_f1")) + (" ³" if run.get("strategy") == "split" else ""),
        _rounds_cell(run),
        _num(run.get("wall_seconds"), ".1f"),
        _num(run.get("client_cpu_seconds_per_tenant"), ".1f") + (" ²" if pooled else ""),
        _num(run.get("client_cpu_seconds_per_sample"), ".2e") + (" ²" if pooled else ""),
        "n/a" if rss is None else f"{rss / 2**20:.0f}" + ("" if growth is None else f" (+{growth / 2**20:.0f})"),
        _num(None if run.get("server_peak_rss_bytes") is None else run["server_peak_rss_bytes"] / 2**20, ".0f"),
        _bytes(run.get("bytes_per_client_per_round")),
        _num(run.get("round_trips_per_step"), ".3f"),
        _pct(run.get("flower_wait_fraction")),
    ]


def _tenant_key(name: str) -> tuple[int, str]:
    match = re.search(r"(\d+)$", name)
    return (int(match.group(1)) if match else -1, name)


def per_tenant_table(rows: list[dict]) -> list[str]:
    """Accuracy / macro-F1 of every tenant (its own test split) in every run that has them."""
    rows = [r for r in rows if r.get("per_tenant_accuracy")]
    tenants = sorted({t for r in rows for t in r["per_tenant_accuracy"]}, key=_tenant_key)
    if not rows:
        return []
    lines = ["## Per tenant: accuracy / macro-F1 on its own test split", "",
             "| run | " + " | ".join(tenants) + " |", "|---|" + "---:|" * len(tenants)]
    for run in rows:
        f1 = run.get("per_tenant_macro_f1") or {}
        cells = [f"{100 * run['per_tenant_accuracy'][t]:.1f} / {100 * f1[t]:.1f}" if t in run["per_tenant_accuracy"]
                 and t in f1 else "n/a" for t in tenants]
        lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def equal_rounds_table(rows: list[dict]) -> list[str]:
    """Per-tenant accuracy after a selection of rounds, every run with a per-round curve."""
    curves = {r["name"]: {p[0]: p[2] for p in curve(r)}
              for r in rows if r.get("mode") == "federated" and r.get("rounds")}
    curves = {name: points for name, points in curves.items() if points}
    every = sorted({k for points in curves.values() for k in points if k is not None})
    if not every:
        return []
    chosen = [k for k in every if k <= 3 or k % 5 == 0 or k == every[-1]]
    lines = ["## At equal rounds: per-tenant accuracy after round k", "",
             "| run | " + " | ".join(str(k) for k in chosen) + " |", "|---|" + "---:|" * len(chosen)]
    for name, points in curves.items():
        lines.append(f"| {name} | " + " | ".join(_pct(points.get(k)) if k in points else "—" for k in chosen) + " |")
    return [*lines, ""]


def cost_table(rows: list[dict]) -> list[str]:
    """Client CPU seconds per tenant each run spent to first reach a per-tenant accuracy."""
    curves = {r["name"]: curve(r) for r in rows}
    curves = {name: points for name, points in curves.items() if points and all(p[1] is not None for p in points)}
    if not curves:
        return []
    best = max(p[2] for points in curves.values() for p in points)
    levels = [t for t in THRESHOLDS if t <= best] + [t for t in THRESHOLDS if t > best][:1]
    lines = ["## At equal client compute: client CPU s per tenant to first reach a per-tenant accuracy", "",
             "| run | " + " | ".join(f"≥ {100 * t:g} %" for t in levels) + " |", "|---|" + "---:|" * len(levels)]
    for name, points in curves.items():
        cells = [next((f"{cpu:.1f}" for _, cpu, acc in points if acc >= level), "—") for level in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_report(spec: CompareSpec, runs: list[dict], skipped: list[dict]) -> str:
    config = spec.base_config()
    rows = expand_runs(runs)
    lines = [
        "# flower-split comparison",
        "",
        f"Config `{spec.source}`: model `{config.model}`, dataset `{config.dataset}`, seed {config.seed}, "
        f"{spec.num_clients} tenants, partition `{spec.partition}`, {spec.rounds} rounds "
        f"(FedAvg family: up to {spec.fedavg_rounds} rounds of {spec.local_epochs} local epoch(s); split: "
        f"{resolve_local_steps(spec)} micro-batches per tenant per round; centralized: "
        f"{spec.centralized_epochs} epochs).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(table_row(run)) + " |" for run in rows]
    lines += [""]
    for item in skipped:
        lines.append(f"- **{item['name']}** not run: {item['reason']}")
    if skipped:
        lines.append("")
    lines += per_tenant_table(rows) + equal_rounds_table(rows) + cost_table(rows) + NOTES
    return "\n".join(lines)


NOTES = [
    "How each column is measured:",
    "",
    "- **per-tenant accuracy / macro-F1**: every tenant evaluates on its own test split (test rows dealt "
    "out with the label distribution of its training partition); example-weighted mean over tenants after "
    "the last round. Macro-F1 per tenant over the classes present in its split or its predictions. "
    "¹ Centralized: on the whole sampled test set (one model).",
    "- **global test accuracy / macro-F1**: on the whole sampled test set. Centralized and FedAvg/FedProx: the "
    "one global model (evaluated by the ServerApp). ³ Split has no global model (each tenant has its "
    "own adapters): the plain mean over tenants of each tenant's adapters on the whole test set — it "
    "measures how far a tenant's model transfers beyond its own label distribution, not the headline. "
    "Local-only and personalised rows have no global model either (n/a).",
    "- **rounds**: rounds run / maximum; \"(plateau)\": the plateau rule stopped the run (no gain above "
    "`plateau_delta` for `plateau_patience` evaluations). Personalised rows: the run's rounds plus the "
    "local fine-tuning epochs.",
    "- **wall time**: centralized: training + evaluation. Federated: the ServerApp's rounds and "
    "evaluations after a warm-up message that started every client (Ray actors, imports, model and data "
    "loading: `startup_seconds` in results.json); all clients share this machine's cores.",
    "- **client CPU s / tenant** and **/ sample**: process CPU seconds (`time.process_time`, all threads) "
    "spent in client training handlers (personalised rows: plus the fine-tuning), per tenant and over "
    "training samples processed; evaluation, model loading and tokenization excluded. ² Pooled data, no "
    "client: centralized LoRA's trainer CPU (training and evaluation) and the pooled probe's CPU (features "
    "and fit), divided by the number of tenants. Probes: the frozen body's forward pass over the rows and "
    "the L-BFGS fits.",
    "- **client peak RSS**: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the client process — a "
    "Ray actor that may serve several tenants in turn, with Python, torch, Flower and Ray loaded — "
    "maximum over tenants; in parentheses its growth above the actor's peak RSS at its first message "
    "(the client's own model, data and activations).",
    "- **ServerApp peak RSS**: the process that ran the ServerApp (cloud, and the dealer where co-located), "
    "sampled every 0.25 s over the run from `/proc/self/statm`; in simulation that process also holds "
    "Flower's simulation engine and Ray's driver (n/a: runs without a ServerApp, or results from before "
    "it was recorded). A deployment's ServerApp records its own `ru_maxrss`.",
    "- **bytes / client / round**: serialized ArrayRecord sizes (plus ConfigRecord `bytes` values) "
    "sent up plus down per tenant in a training round, mean over rounds; evaluation traffic excluded "
    "(it is in results.json as `eval_bytes_up/down`).",
    "- **round trips / step**: Flower round trips per optimizer step of a tenant in a training round "
    "(FedAvg: one train round trip per round over the mean local steps).",
    "- **Flower wait**: split only: share of the training rounds' wall time the ServerApp spent in "
    "`send_and_receive` (the rest is the cloud's own work and bookkeeping; n/a where not measured).",
    "- **equal rounds / equal compute**: from each run's per-round curve (`rounds` in results.json); client "
    "CPU per tenant is cumulative over the rounds up to the first evaluation at or above the accuracy. Runs "
    "without rounds appear once, at their total cost.",
    "",
    "Plots: `accuracy_vs_round.png` (per-tenant accuracy per round; FedAvg global-test accuracy dashed; "
    "runs without rounds as horizontal lines), `accuracy_vs_cpu.png` (per-tenant accuracy against client "
    "CPU per tenant), `per_tenant_<run>.png` (every tenant's accuracy per round; personalised scores as "
    "stars) and `costs.png`.",
    "",
]
