"""``flower-split compare``: centralized LoRA, the FedAvg-LoRA family and split on the same data, one report.

A TOML file describes the comparison (see ``simulations/configs/*.toml``)::

    [run]          RunConfig fields shared by every run: model, dataset, seed, subsets, lr, ...
                   (not ``mode`` / ``security`` / ``epochs``: each run sets its own)
    [federation]   num_clients, rounds, partition ("iid", "dirichlet:ALPHA", "shards:N"), and
                   optional Flower settings: eval_every, eval_initial, reply_timeout, global_eval
    [centralized]  epochs (default: rounds x fedavg.local_epochs, the same passes over the data)
    [fedavg]       the FedAvg family (fedavg, fedprox, local-only): local_epochs (default 1),
                   rounds (default: federation.rounds; the maximum with a plateau rule),
                   plateau_patience / plateau_delta (stop once per-tenant accuracy has not gained
                   more than delta, default 0.002, for that many evaluations; 0: never),
                   personalize_epochs (fedavg and fedprox: afterwards each tenant fine-tunes the
                   final model on its own rows, a second row "<run>-personalized"; default 0)
    [fedprox]      mu: FedProx's proximal weight (default 0, which is FedAvg)
    [split]        local_steps: micro-batches per tenant and round, or "auto" (default: the mean
                   partition's batches x fedavg.local_epochs, so each round sees as many samples
                   as a FedAvg round); micro_batches (per Flower message, default 8);
                   share / share_threshold: the ``-share`` runs' cross-tenant sharing scope
                   ("tail", "head-tail" or "all", default "head-tail") and SecAgg+ threshold
    [compare]      runs: any of "centralized", "fedavg", "fedprox", "local-only", "probes" (linear
                   probes on the frozen body: own rows / pooled rows, reference rows),
                   "split-plain", "split-secure-he", "split-secure-client", and each of these
                   with "-share" (adapters averaged across tenants under SecAgg+ after every
                   round, the classifier personal; docs/secure.md §10) (default: centralized,
                   fedavg and the split runs; the secure runs use the two label
                   protections and skip the whole-test-set evaluation, ``global-eval``, which
                   would cost ten times the per-tenant one);
                   threads: torch threads of the centralized run (default 1, like each simulated
                   client: Ray gives every client actor one CPU, and torch then uses one thread)

Keys may use dashes or underscores. The whole file is validated before anything runs; an
unknown section or key, or a bad value, fails with ``<file>: <section>.<key>: <reason>``.

Every run uses the same seed, data subsets and (federated runs) partitions and per-tenant test
splits. Outputs in ``--out``: ``results.json`` (all runs, ``flower-split train`` schema plus the
federated fields of :func:`flower_split.runs.simulate.simulate`), ``report.md`` (the tables of
:mod:`flower_split.runs.report`) and the plots of :mod:`flower_split.runs.report_plots`.
``--resume`` reuses the runs of an earlier ``results.json`` in ``--out`` whose inputs are
identical (the MiniLM comparison takes hours on a CPU; an interrupted one, or one with a run
added or retuned, repeats no finished work). The FedAvg-family runs also save their state after
every round under ``--out/state/<run>-<inputs digest>/`` (:mod:`flower_split.flower.fedavg_checkpoint`):
with ``--resume`` an interrupted one goes on after its last saved round; without, it starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flower_split.backends import compare_variants
from flower_split.config import ConfigError
from flower_split.runs.compare_spec import FEDAVG_KINDS, SHARE_SUFFIX, CompareSpec, load_spec, resolve_local_steps, select_runs
from flower_split.runs.report import expand_runs, render_report, table_row
from flower_split.runs.report_plots import plot


def federated_values(spec: CompareSpec, kind: str) -> dict[str, Any]:
    """The Flower ``run_config`` of federated run ``kind`` (``fedavg`` or a split variant's name)."""
    values = {**spec.run, **spec.flower, "num_server_rounds": spec.rounds, "partition": spec.partition,
              "min_nodes": spec.num_clients}
    if kind in FEDAVG_KINDS:
        values.update(num_server_rounds=spec.fedavg_rounds, local_epochs=spec.local_epochs,
                      baseline=FEDAVG_KINDS[kind], **spec.fedavg_options)
        if kind == "fedprox":
            values["proximal_mu"] = spec.proximal_mu
        if kind == "local-only":
            values.pop("personalize_epochs", None)  # a local model is its tenant's own already
    else:
        variant = kind.removesuffix(SHARE_SUFFIX)
        values.update(local_steps=resolve_local_steps(spec), micro_batches=spec.micro_batches,
                      **compare_variants()[variant], **(spec.sharing if variant != kind else {}))
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
        "client_cpu_seconds_per_tenant": run["client_cpu_seconds"] / spec.num_clients,  # its share, pooled
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
    if kind == "probes":
        return {"config": spec.base_config().to_dict(), "partition": spec.partition,
                "num_clients": spec.num_clients, "threads": spec.threads}
    return {"run_config": federated_values(spec, kind), "num_clients": spec.num_clients}


def _saved_runs(out: Path) -> list[dict]:
    """The runs of ``out/results.json``, for ``--resume`` (none if the file is absent)."""
    target = out / "results.json"
    if not target.exists():
        return []
    try:
        runs = json.loads(target.read_text(encoding="utf-8"))["runs"]
        if not isinstance(runs, list) or not all(isinstance(run, dict) and "name" in run for run in runs):
            raise ValueError("'runs' must be a list of runs, each with a name")
        return runs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: cannot read {target}: {exc}") from exc


def _earlier_runs(saved: list[dict]) -> dict[str, dict]:
    """The saved runs ``--resume`` may reuse, by name: a run without a test accuracy (every tenant
    dropped from evaluation) is run again."""
    return {run["name"]: run for run in saved if "inputs" in run and run.get("test_accuracy") is not None}


def _other_runs(saved: list[dict], kinds: list[str]) -> list[dict]:
    """The saved runs this invocation does not run (``--runs`` picked others): ``--resume`` keeps
    them in the comparison, so adding a run never drops the earlier ones."""
    return [run for run in saved if run.get("compare_run") not in kinds]


def _execute(spec: CompareSpec, kind: str, inputs: dict[str, Any], cpus: int | None, progress: bool,
             out: Path, resume: bool) -> list[dict]:
    from flower_split.runs.simulate import simulate

    if kind == "centralized":
        return [run_centralized(spec, progress)]
    if kind == "probes":
        from flower_split.runs.probes import run_probes

        return run_probes(spec.base_config(), spec.partition, spec.num_clients, spec.threads, progress)
    if kind in FEDAVG_KINDS:
        state_dir, session = checkpoint_location(out, kind, inputs)
        values = {**inputs["run_config"], "state-dir": str(state_dir), "session": session}
        if not resume:
            shutil.rmtree(state_dir / session, ignore_errors=True)  # start over
        return [simulate("fedavg", values, spec.num_clients, progress=progress, cpus=cpus)]
    return [simulate("split", inputs["run_config"], spec.num_clients, progress=progress, cpus=cpus)]


def checkpoint_location(out: Path, kind: str, inputs: dict[str, Any]) -> tuple[Path, str]:
    """(state-dir, session) where FedAvg-family run ``kind`` saves its rounds: a session per
    run and inputs, so a retuned run never resumes another's state. The run config enters as the
    checkpoint's fingerprint (:func:`run_config_sha256`), so what only says how long to wait (a
    raised ``reply-timeout``) keeps the session, as the checkpoint itself allows."""
    from flower_split.flower.fedavg_checkpoint import run_config_sha256

    kept = {**inputs, "run_config": run_config_sha256(inputs["run_config"])}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    return out.resolve() / "state", f"{kind}-{digest[:12]}"


def run_compare(spec: CompareSpec, out: str | Path, cpus: int | None = None, progress: bool = True,
                resume: bool = False) -> dict:
    """Run every run of ``spec``; write results.json, report.md and the plots into ``out``.

    With ``resume``, a run already in ``out/results.json`` with identical inputs
    (:func:`run_inputs`) is reused instead of run again, so an interrupted comparison, or one
    that adds a run, repeats no work, and the runs of the file that ``spec`` does not run are kept
    (first). The merged file is written after every run.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = _saved_runs(out) if resume else []
    earlier = _earlier_runs(saved)
    runs: list[dict] = _other_runs(saved, spec.runs)
    skipped: list[dict] = []
    started = time.perf_counter()
    for kind in spec.runs:
        inputs = run_inputs(spec, kind)
        previous = [run for run in earlier.values() if run.get("compare_run") == kind and run["inputs"] == inputs]
        if previous:
            if progress:
                print(f"[{kind}] reused from {out / 'results.json'} (identical inputs)", flush=True)
            runs.extend(previous)
            continue
        try:
            runs.extend({**run, "compare_run": kind, "inputs": inputs}
                        for run in _execute(spec, kind, inputs, cpus, progress, out, resume))
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
                        "local_epochs": spec.local_epochs, "centralized_epochs": spec.centralized_epochs,
                        "fedavg_rounds": spec.fedavg_rounds}}


def _write_json(target: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------
# report and plots

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
    for run in expand_runs(results["runs"]):
        print("  " + " | ".join(table_row(run)))
    print(f"-> {Path(args.out) / 'results.json'}, {Path(args.out) / 'report.md'}")
    return 1 if any(s["reason"].startswith("failed") for s in results["skipped"]) else 0
