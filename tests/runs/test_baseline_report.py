"""The comparison's baseline rows (issue 18): config sections, the FedAvg family's results.json entry
(metered, in process: no Ray), the linear-probe rows, and the report's tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flower_split.config import ConfigError
from flower_split.flower.fedavg_client_app import make_fedavg_client_app, prepare
from flower_split.flower.fedavg_server_app import run_fedavg_cloud
from flower_split.flower.fedavg_settings import fedavg_settings_from_run_config
from flower_split.flower.metering import cost_mod
from flower_split.runs.compare import federated_values, run_inputs
from flower_split.runs.compare_spec import load_spec
from flower_split.runs.probes import run_probes
from flower_split.runs.report import COLUMNS, expand_runs, render_report
from flower_split.runs.report_plots import plot
from flower_split.flower.results import run_entry
from flower_split.flower.results import Collector
from flower_split.runs.simulate import _add_warm_up, warm_up
from flower_helpers import LocalGrid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toml(sections: dict[str, dict]) -> str:
    lines = []
    for name, table in sections.items():
        lines += [f"[{name}]", *(f"{key} = {json.dumps(value)}" for key, value in table.items()), ""]
    return "\n".join(lines)


def _spec_file(tmp_path: Path, dataset: str = "banking77", **extra: dict) -> Path:
    sections = {
        "run": {"model": "tiny", "dataset": dataset, "device": "cpu", "max_train_samples": 64,
                "max_test_samples": 32, "lr": 0.01, "batch_size": 16},
        "federation": {"num_clients": 2, "rounds": 2, "partition": "iid", "global_eval": False},
        "fedavg": {"local_epochs": 1, "rounds": 3, "plateau_patience": 2, "personalize_epochs": 1},
        "fedprox": {"mu": 0.1},
        "compare": {"runs": ["fedavg", "fedprox", "local-only", "probes"]},
        **extra,
    }
    path = tmp_path / "c.toml"
    path.write_text(_toml(sections))
    return path


def test_baseline_sections_become_each_runs_flower_config(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path))
    fedavg, fedprox, local = (federated_values(spec, kind) for kind in ("fedavg", "fedprox", "local-only"))
    assert fedavg["num-server-rounds"] == 3 and fedavg["baseline"] == "fedavg" and fedavg["plateau-patience"] == 2
    assert fedavg["personalize-epochs"] == 1 and "proximal-mu" not in fedavg and fedavg["global-eval"] is False
    assert fedprox["baseline"] == "fedprox" and fedprox["proximal-mu"] == 0.1
    assert local["baseline"] == "local-only" and "personalize-epochs" not in local
    for values in (fedavg, fedprox, local):  # each is a valid FedAvg-family run_config
        fedavg_settings_from_run_config(values)
    assert run_inputs(spec, "probes")["num_clients"] == 2
    assert load_spec(_spec_file(tmp_path, compare={})).runs == ["centralized", "fedavg", "split-plain",
                                                                   "split-secure-he", "split-secure-client"]


@pytest.mark.parametrize("extra, message", [
    ({"fedprox": {"mu": -1}}, "fedprox.mu: expected a finite number"),
    ({"fedprox": {"nu": 1}}, "fedprox.nu: unknown field"),
    ({"fedavg": {"rounds": 0}}, "fedavg.rounds: expected a positive integer"),
    ({"fedavg": {"plateau_patience": -2}}, "fedavg.plateau_patience: expected an integer >= 0"),
    ({"fedavg": {"personalise_epochs": 1}}, "fedavg.personalise_epochs: unknown field"),
])
def test_bad_baseline_fields_are_named(tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec_file(tmp_path, **extra))


def _metered_run(values: dict) -> dict:
    """A FedAvg-family run through the simulation's collector and cost meters, in process."""
    config, settings, fedavg = fedavg_settings_from_run_config(values)
    collector = Collector(fedavg.run_name, "fedavg", settings, 2, progress=False, warm_up=warm_up,
                          global_model=fedavg.baseline != "local-only")
    client = _add_warm_up(make_fedavg_client_app(values, mods=[cost_mod(lambda c: prepare(c, values))]))
    run_fedavg_cloud(collector.wrap(LocalGrid(client, 2)), values, collector.on_report)
    return run_entry(fedavg.run_name, "fedavg", config, settings, fedavg, 2, collector.collected, 1.0)


def test_fedavg_entry_has_the_curve_the_plateau_and_the_personalised_scores(task_identity: None) -> None:
    values = {"model": "tiny", "device": "cpu", "partition": "iid", "lr": 0.01, "batch-size": 16,
              "max-train-samples": 64, "max-test-samples": 32, "num-server-rounds": 2, "min-nodes": 2,
              "reply-timeout": 120.0, "personalize-epochs": 1, "plateau-patience": 5}
    run = _metered_run(values)
    assert run["name"] == "fedavg-lora" and run["rounds_run"] == 2 and not run["plateau_stopped"]
    for r in run["rounds"]:  # the per-round curve: per-tenant accuracy and macro-F1
        assert sorted(r["per_tenant_accuracy"]) == sorted(r["per_tenant_macro_f1"]) == ["tenant-0", "tenant-1"]
        assert r["client_cpu_seconds"] > 0
    personal = run["personalized"]
    assert personal["epochs"] == 1 and sorted(personal["per_tenant_accuracy"]) == ["tenant-0", "tenant-1"]
    assert personal["client_finetune_cpu_seconds"] > 0 and personal["finetune_examples"] == 64
    assert personal["client_train_cpu_seconds"] == pytest.approx(
        run["client_train_cpu_seconds"] + personal["client_finetune_cpu_seconds"])
    assert run["client_cpu_seconds_per_tenant"] == pytest.approx(run["client_train_cpu_seconds"] / 2)
    assert all(c["finetune_cpu_seconds"] > 0 for c in run["clients"])
    local = _metered_run({**values, "baseline": "local-only", "personalize-epochs": 0})
    assert local["name"] == "local-lora" and local["global_test_accuracy"] is None
    assert local["rounds"][1]["bytes_down"] == 0 and local["rounds"][0]["bytes_down"] > 0  # the start only
    assert all(r["bytes_up"] == 0 for r in local["rounds"]) and local["personalized"] is None


def test_probe_rows_score_every_tenant(small_banking: str) -> None:
    from flower_split.config import RunConfig

    config = RunConfig(model="tiny", dataset=small_banking, device="cpu", max_train_samples=160, max_test_samples=80)
    own, pooled = run_probes(config, "dirichlet:100", 2, progress=False)
    assert (own["name"], pooled["name"]) == ("probe-own-data", "probe-pooled")
    for run in (own, pooled):
        assert sorted(run["per_tenant_accuracy"]) == sorted(run["per_tenant_macro_f1"]) == ["tenant-0", "tenant-1"]
        assert sum(run["per_tenant_test_examples"].values()) == 80 and 0 <= run["test_accuracy"] <= 1
        assert run["client_cpu_seconds_per_tenant"] > 0
    assert pooled["global_test_accuracy"] is not None and own["global_test_accuracy"] is None


def _synthetic_runs() -> list[dict]:
    def rounds(accuracies: list[float], cpu: float) -> list[dict]:
        return [{"round": k + 1, "test_accuracy": a, "test_macro_f1": a - 0.1, "client_cpu_seconds": cpu,
                 "per_tenant_accuracy": {"tenant-0": a, "tenant-1": a + 0.02}, "global_test_accuracy": None}
                for k, a in enumerate(accuracies)]

    common = {"mode": "federated", "num_clients": 2, "per_tenant_macro_f1": {"tenant-0": 0.5, "tenant-1": 0.6},
              "per_tenant_accuracy": {"tenant-0": 0.7, "tenant-1": 0.72}, "client_peak_rss_bytes": 2**30}
    fedavg = {**common, "name": "fedavg-lora", "strategy": "fedavg", "test_accuracy": 0.71, "num_server_rounds": 10,
              "rounds_run": 4, "plateau_stopped": True, "rounds": rounds([0.5, 0.7, 0.71, 0.71], 20.0),
              "client_cpu_seconds_per_tenant": 40.0,
              "personalized": {"epochs": 2, "test_accuracy": 0.86, "test_macro_f1": 0.8,
                               "per_tenant_accuracy": {"tenant-0": 0.85, "tenant-1": 0.87},
                               "per_tenant_macro_f1": {"tenant-0": 0.8, "tenant-1": 0.8},
                               "client_cpu_seconds_per_tenant": 50.0}}
    local = {**common, "name": "local-lora", "strategy": "fedavg", "test_accuracy": 0.6, "num_server_rounds": 10,
             "rounds_run": 10, "rounds": rounds([0.3] * 9 + [0.6], 20.0), "client_cpu_seconds_per_tenant": 100.0}
    probe = {"name": "probe-own-data", "mode": "reference", "test_accuracy": 0.89, "client_cpu_seconds_per_tenant": 3.0,
             "per_tenant_accuracy": {"tenant-0": 0.9, "tenant-1": 0.88},
             "per_tenant_macro_f1": {"tenant-0": 0.8, "tenant-1": 0.7}, "rounds": []}
    return [fedavg, local, probe]


def test_report_has_the_baseline_rows_per_tenant_scores_and_plots(tmp_path: Path) -> None:
    runs = _synthetic_runs()
    assert [r["name"] for r in expand_runs(runs)] == ["fedavg-lora", "fedavg-lora-personalized", "local-lora",
                                                      "probe-own-data"]
    report = render_report(load_spec(_spec_file(tmp_path)), runs, [])
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.count("|") == len(COLUMNS) + 1]
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == [r["name"] for r in expand_runs(runs)]
    assert "| fedavg-lora | 71.00 % |" in report and "4/10 (plateau)" in report and "4 + 2 local ep." in report
    assert "| fedavg-lora-personalized | 86.00 % |" in report
    assert "| probe-own-data | 90.0 / 80.0 | 88.0 / 70.0 |" in report  # per tenant: accuracy / macro-F1
    assert "## At equal rounds" in report and "| local-lora | 30.00 % |" in report
    cost = report[report.index("## At equal client compute"):].splitlines()
    # cumulative CPU per tenant (20 s per round over 2 tenants) to first reach 50, 60, 70 %
    assert "| fedavg-lora | 10.0 | 20.0 | 20.0 | — | — | — | — |" in cost
    assert "| probe-own-data | 3.0 | 3.0 | 3.0 | 3.0 | 3.0 | 3.0 | — |" in cost
    paths = plot(runs, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["accuracy_vs_cpu.png", "accuracy_vs_round.png", "costs.png", "per_tenant_fedavg-lora.png",
                     "per_tenant_local-lora.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_plots_are_skipped_with_a_message_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot(_synthetic_runs(), tmp_path) == []
    assert "matplotlib is not installed" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_shipped_baseline_configs_are_valid() -> None:
    configs = Path(__file__).parents[2] / "simulations" / "configs"
    full = load_spec(configs / "banking77-10tenants.toml")
    assert {"fedavg", "fedprox", "local-only", "probes"} <= set(full.runs) and full.proximal_mu > 0
    capped = load_spec(configs / "banking77-10tenants-baselines-capped.toml")
    assert capped.num_clients == full.num_clients == 10 and capped.partition == full.partition
    assert capped.fedavg_options["plateau_patience"] > 0 and capped.fedavg_rounds >= 20


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "simulations" / "configs").glob("*.toml")),
                         ids=lambda path: path.name)
def test_every_shipped_config_loads(path: Path) -> None:
    """Each config a BENCHMARKS command names must parse and validate (the commands are in docs)."""
    spec = load_spec(path)
    assert spec.runs and spec.num_clients >= 1
