"""``flower-split compare``: centralized LoRA vs FedAvg-LoRA vs split on the same data, one report.

A TOML file describes the comparison (see ``simulations/configs/*.toml``)::

    [run]          RunConfig fields shared by every run: model, dataset, seed, subsets, lr, ...
                   (not ``mode`` / ``security`` / ``epochs``: each run sets its own)
    [federation]   num_clients, rounds, partition ("iid", "dirichlet:ALPHA", "shards:N"), and
                   optional Flower settings: eval_every, eval_initial, reply_timeout
    [centralized]  epochs (default: rounds x fedavg.local_epochs, the same passes over the data)
    [fedavg]       local_epochs (default 1)
    [split]        local_steps: micro-batches per tenant and round, or "auto" (default: the mean
                   partition's batches x fedavg.local_epochs, so each round sees as many samples
                   as a FedAvg round); micro_batches (per Flower message, default 8)
    [compare]      runs: any of "centralized", "fedavg", "split-plain", "split-secure-he",
                   "split-secure-client" (default: all; the secure runs use the two label
                   protections and skip the whole-test-set evaluation, ``global-eval``, which
                   would cost ten times the per-tenant one);
                   threads: torch threads of the centralized run (default 1, like each simulated
                   client: Ray gives every client actor one CPU, and torch then uses one thread)

Keys may use dashes or underscores. The whole file is validated before anything runs; an
unknown section or key, or a bad value, fails with ``<file>: <section>.<key>: <reason>``.

Every run uses the same seed, data subsets and (federated runs) partitions and per-tenant test
splits. Outputs in ``--out``: ``results.json`` (all runs, ``flower-split train`` schema plus the
federated fields of :func:`flower_split.runs.simulate.simulate`), ``report.md`` (one table) and
``accuracy_vs_round.png``, ``costs.png``. ``--resume`` reuses the runs of an earlier
``results.json`` in ``--out`` whose inputs are identical (the MiniLM comparison takes hours on a
CPU; an interrupted one, or one with a run added or retuned, repeats no finished work).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from flower_split.backends import compare_variants
from flower_split.config import ConfigError, RunConfig

SECTIONS = ("run", "federation", "centralized", "fedavg", "split", "compare")
# the split runs are every security backend's variants: split-plain, split-secure-he, split-secure-client
RUN_KINDS = ("centralized", "fedavg", *compare_variants())
FEDERATION_KEYS = {"num_clients", "rounds", "partition", "eval_every", "eval_initial", "reply_timeout"}
SET_BY_COMPARE = {"mode", "security", "epochs"}


@dataclass
class CompareSpec:
    """A validated comparison."""

    source: str
    run: dict[str, Any]
    num_clients: int
    rounds: int
    partition: str
    flower: dict[str, Any]
    centralized_epochs: int
    local_epochs: int
    local_steps: int | str
    micro_batches: int
    runs: list[str]
    threads: int = 1
    raw: dict[str, Any] = field(default_factory=dict)

    def base_config(self) -> RunConfig:
        return RunConfig.from_mapping(self.run)

    def centralized_config(self) -> RunConfig:
        """The centralized run's RunConfig: the shared fields, ``centralized.epochs`` epochs."""
        return RunConfig.from_mapping({**self.run, "mode": "centralized", "epochs": self.centralized_epochs})


def _norm(section: str, table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{section}] must be a table, got {type(table).__name__}")
    return {key.replace("-", "_"): value for key, value in table.items()}


def _only(section: str, values: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in values:
        if key not in allowed:
            raise ConfigError(f"{where}: {section}.{key}: unknown field (allowed: {', '.join(sorted(allowed))})")


def _positive(section: str, key: str, value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: {section}.{key}: expected a positive integer, got {value!r}")
    return value


def load_spec(path: str | Path) -> CompareSpec:
    """Read and validate a comparison TOML file; :class:`ConfigError` names file, section and key."""
    path = Path(path)
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{where}: [{section}]: unknown section (allowed: {', '.join(SECTIONS)})")
    tables = {name: _norm(name, raw.get(name, {}), where) for name in SECTIONS}

    run = tables["run"]
    for key in run:
        if key in SET_BY_COMPARE:
            raise ConfigError(f"{where}: run.{key}: set by the comparison for each run; remove it "
                              f"(centralized epochs go in [centralized])")
    try:
        RunConfig.from_mapping(run)
    except ConfigError as exc:
        raise ConfigError(f"{where}: run.{exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: run: {exc}") from None

    federation = tables["federation"]
    _only("federation", federation, FEDERATION_KEYS, where)
    for key in ("num_clients", "rounds"):
        if key not in federation:
            raise ConfigError(f"{where}: federation.{key}: required")
    num_clients = _positive("federation", "num_clients", federation["num_clients"], where)
    rounds = _positive("federation", "rounds", federation["rounds"], where)
    partition = federation.get("partition", "iid")
    flower = {k: federation[k] for k in ("eval_every", "eval_initial", "reply_timeout") if k in federation}
    from flower_split.flower.settings import FlowerSettings

    try:
        FlowerSettings(num_server_rounds=rounds, partition=partition, min_nodes=num_clients, **flower).validate()
    except ConfigError as exc:
        name, _, reason = str(exc).partition(":")
        raise ConfigError(f"{where}: federation.{name.replace('-', '_')}:{reason}") from None

    fedavg = tables["fedavg"]
    _only("fedavg", fedavg, {"local_epochs"}, where)
    local_epochs = _positive("fedavg", "local_epochs", fedavg.get("local_epochs", 1), where)

    centralized = tables["centralized"]
    _only("centralized", centralized, {"epochs"}, where)
    epochs = _positive("centralized", "epochs", centralized.get("epochs", rounds * local_epochs), where)

    split = tables["split"]
    _only("split", split, {"local_steps", "micro_batches"}, where)
    local_steps = split.get("local_steps", "auto")
    if local_steps != "auto":
        _positive("split", "local_steps", local_steps, where)
    micro_batches = _positive("split", "micro_batches", split.get("micro_batches", 8), where)

    compare = tables["compare"]
    _only("compare", compare, {"runs", "threads"}, where)
    threads = _positive("compare", "threads", compare.get("threads", 1), where)
    runs = compare.get("runs", list(RUN_KINDS))
    if not isinstance(runs, list) or not runs or not all(r in RUN_KINDS for r in runs):
        raise ConfigError(f"{where}: compare.runs: expected a non-empty list of {RUN_KINDS}, got {runs!r}")
    return CompareSpec(where, run, num_clients, rounds, partition, flower, epochs, local_epochs,
                       local_steps, micro_batches, list(dict.fromkeys(runs)), threads, raw)


# ---------------------------------------------------------------------------------------------
# running


def resolve_local_steps(spec: CompareSpec) -> int:
    """``auto``: the mean tenant's batches per FedAvg round (same samples per round)."""
    if spec.local_steps != "auto":
        return int(spec.local_steps)
    from flower_split.data.tenants import sample_rows
    from flower_split.data import load_dataset

    config = spec.base_config()
    train, _ = load_dataset(config.dataset, config.data_dir)
    rows = len(sample_rows(len(train), config.max_train_samples, config.seed))
    return max(1, math.ceil(rows / spec.num_clients / config.batch_size * spec.local_epochs))


def federated_values(spec: CompareSpec, kind: str) -> dict[str, Any]:
    """The Flower ``run_config`` of federated run ``kind`` (``fedavg`` or a split variant's name)."""
    values = {**spec.run, **spec.flower, "num_server_rounds": spec.rounds, "partition": spec.partition,
              "min_nodes": spec.num_clients}
    if kind == "fedavg":
        values["local_epochs"] = spec.local_epochs
    else:
        values.update(local_steps=resolve_local_steps(spec), micro_batches=spec.micro_batches,
                      **compare_variants()[kind])
    return {key.replace("_", "-"): value for key, value in values.items()}


def run_centralized(spec: CompareSpec, progress: bool = True) -> dict:
    from flower_split.runs.local import train
    from flower_split.data import load_dataset
    from flower_split.data.tenants import sample_rows

    import torch

    config = spec.centralized_config()
    if progress:
        print(f"[centralized-lora] {config.epochs} epochs on pooled data, {spec.threads} torch thread(s) ...",
              flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        run = train(config, progress=False)
    finally:
        torch.set_num_threads(threads)
    run["torch_threads"] = spec.threads
    train_rows, _ = load_dataset(config.dataset, config.data_dir)
    samples = len(sample_rows(len(train_rows), config.max_train_samples, config.seed)) * config.epochs
    run.update({
        "global_test_accuracy": run["test_accuracy"],
        "global_test_macro_f1": run["test_macro_f1"],
        "train_examples_processed": samples,
        "client_cpu_seconds_per_sample": run["client_cpu_seconds"] / samples if samples else None,
        "client_peak_rss_bytes": None,  # no client: the data is pooled
        "bytes_per_client_per_round": 0,
        "round_trips_per_step": 0.0,
        "rounds": [{"round": e + 1, "train_loss": loss, "test_accuracy": None}
                   for e, loss in enumerate(run["train_loss_history"])],
    })
    if progress:
        print(f"[centralized-lora] test accuracy {run['test_accuracy']:.4f}, {run['wall_seconds']:.1f} s", flush=True)
    return run


def run_inputs(spec: CompareSpec, kind: str) -> dict[str, Any]:
    """Everything that determines the outcome of run ``kind`` (``--resume`` reuses a run only if
    these are identical): the centralized RunConfig and torch threads, or the Flower run config
    and number of tenants of a federated run."""
    if kind == "centralized":
        config = spec.centralized_config()
        return {"config": config.to_dict(), "threads": spec.threads}
    return {"run_config": federated_values(spec, kind), "num_clients": spec.num_clients}


def _earlier_runs(out: Path) -> dict[str, dict]:
    """Runs of ``out/results.json`` by name, for ``--resume`` (none if the file is absent)."""
    target = out / "results.json"
    if not target.exists():
        return {}
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
        # a run without a test accuracy (every tenant dropped from evaluation) is run again
        return {run["name"]: run for run in data["runs"] if "inputs" in run and run.get("test_accuracy") is not None}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: cannot read {target}: {exc}") from exc


def _execute(spec: CompareSpec, kind: str, inputs: dict[str, Any], cpus: int | None, progress: bool) -> dict:
    from flower_split.runs.simulate import simulate

    if kind == "centralized":
        return run_centralized(spec, progress)
    strategy = "fedavg" if kind == "fedavg" else "split"
    return simulate(strategy, inputs["run_config"], spec.num_clients, progress=progress, cpus=cpus)


def select_runs(spec: CompareSpec, names: list[str]) -> CompareSpec:
    """``spec`` with only the runs ``names`` (each one of the config's ``[compare] runs``)."""
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in spec.runs]
    if not names or unknown:
        raise ConfigError(f"--runs: {unknown or names!r} not among this config's runs {spec.runs}")
    return replace(spec, runs=list(dict.fromkeys(names)))


def run_compare(spec: CompareSpec, out: str | Path, cpus: int | None = None, progress: bool = True,
                resume: bool = False) -> dict:
    """Run every run of ``spec``; write results.json, report.md and the plots into ``out``.

    With ``resume``, a run already in ``out/results.json`` with identical inputs
    (:func:`run_inputs`) is reused instead of run again, so an interrupted comparison, or one
    that adds a run, repeats no work. The merged file is written after every run.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_runs(out) if resume else {}
    runs: list[dict] = []
    skipped: list[dict] = []
    started = time.perf_counter()
    for kind in spec.runs:
        inputs = run_inputs(spec, kind)
        previous = next((run for run in earlier.values()
                         if run.get("compare_run") == kind and run["inputs"] == inputs), None)
        if previous is not None:
            if progress:
                print(f"[{kind}] reused from {out / 'results.json'} (identical inputs)", flush=True)
            runs.append(previous)
            continue
        try:
            run = _execute(spec, kind, inputs, cpus, progress)
            runs.append({**run, "compare_run": kind, "inputs": inputs})
        except ConfigError as exc:
            skipped.append({"name": kind, "reason": f"configuration not supported: {exc}"})
        except Exception as exc:  # one failed run must not lose the others
            skipped.append({"name": kind, "reason": f"failed: {type(exc).__name__}: {exc}"})
        if skipped and skipped[-1]["name"] == kind and progress:
            print(f"[{kind}] skipped: {skipped[-1]['reason']}", file=sys.stderr, flush=True)
        _write_json(out / "results.json", _results(spec, runs, skipped, time.perf_counter() - started))
    results = _results(spec, runs, skipped, time.perf_counter() - started)
    _write_json(out / "results.json", results)
    (out / "report.md").write_text(render_report(spec, runs, skipped), encoding="utf-8")
    plot(runs, out)
    return results


def _results(spec: CompareSpec, runs: list[dict], skipped: list[dict], seconds: float) -> dict:
    return {"runs": runs, "skipped": skipped,
            "compare": {"config_file": spec.source, "config": spec.raw, "seconds": seconds,
                        "num_clients": spec.num_clients, "rounds": spec.rounds, "partition": spec.partition,
                        "local_epochs": spec.local_epochs, "centralized_epochs": spec.centralized_epochs}}


def _write_json(target: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------
# report and plots

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


def main_compare(args: Any) -> int:
    """The ``compare`` subcommand."""
    try:
        spec = load_spec(args.config)
        if getattr(args, "runs", None):
            spec = select_runs(spec, args.runs.split(","))
    except ConfigError as exc:
        print(f"flower-split: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        results = run_compare(spec, args.out, cpus=args.cpus, resume=args.resume)
    except ConfigError as exc:
        print(f"flower-split: {exc}", file=sys.stderr)
        return 2
    for run in results["runs"]:
        print("  " + " | ".join(table_row(run)))
    print(f"-> {Path(args.out) / 'results.json'}, {Path(args.out) / 'report.md'}")
    return 1 if any(s["reason"].startswith("failed") for s in results["skipped"]) else 0

