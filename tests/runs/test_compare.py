"""``flower-split compare``: config validation, and a small end-to-end comparison (two Ray simulations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flower_split.cli import main
from flower_split.runs.compare import federated_values
from flower_split.runs.compare_spec import load_spec, resolve_local_steps, select_runs
from flower_split.runs.simulate import parse_run_config, run_name
from flower_split.runs.report import COLUMNS
from flower_split.config import ConfigError

RUN_KEYS = {"name", "mode", "security", "dataset", "model", "test_accuracy", "test_macro_f1",
            "train_loss_history", "wall_seconds", "client_cpu_seconds", "bytes_client_to_cloud",
            "bytes_cloud_to_client", "config"}
CONFIGS = Path(__file__).parents[2] / "simulations" / "configs"


def _toml(sections: dict[str, dict]) -> str:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def _base(dataset: str = "banking77") -> dict[str, dict]:
    return {
        "run": {"model": "tiny", "dataset": dataset, "device": "cpu", "max_train_samples": 320,
                "max_test_samples": 120, "lr": 0.01, "head_rank": 8, "tail_bottleneck": 16, "lr_head": 0.02, "lr_tail": 0.3},
        # dirichlet:100 is close to IID (flwr-datasets' "iid" takes contiguous, label-sorted shards)
        "federation": {"num_clients": 2, "rounds": 2, "partition": "dirichlet:100"},
        "fedavg": {"local_epochs": 1},
        "split": {"local_steps": "auto", "micro_batches": 5},
    }


def test_shipped_configs_are_valid() -> None:
    quick = load_spec(CONFIGS / "quick.toml")
    assert quick.base_config().model == "tiny" and 2 <= quick.num_clients <= 3
    full = load_spec(CONFIGS / "banking77-10tenants.toml")
    assert full.base_config().model == "minilm" and full.num_clients == 10
    assert full.partition == "dirichlet:0.5" and full.centralized_epochs == full.rounds * full.local_epochs
    assert resolve_local_steps(full) == 32  # ceil(10003 rows / 10 tenants / 32 per batch)


def _edit(section: str, key: str, value: object) -> dict[str, dict]:
    sections = _base()
    sections.setdefault(section, {})[key] = value
    return sections


@pytest.mark.parametrize("sections, message", [
    (_edit("fedavg", "local_epoch", 1), "fedavg.local_epoch: unknown field"),
    (_edit("run", "lr", -1.0), "run.lr: expected a positive number"),
    (_edit("run", "lr_hed", 0.1), "run.lr_hed: unknown configuration field"),
    (_edit("run", "mode", "split"), "run.mode: set by the comparison"),
    (_edit("federation", "num_clients", 0), "federation.num_clients: expected a positive integer"),
    (_edit("federation", "partition", "dirichlet:x"), "federation.partition"),
    (_edit("federation", "eval_every", -1), "federation.eval_every: expected an integer >= 0"),
    (_edit("split", "local_steps", "many"), "split.local_steps: expected a positive integer"),
    (_edit("centralized", "epochs", 0), "centralized.epochs: expected a positive integer"),
    (_edit("compare", "runs", ["fedavg", "magic"]), "compare.runs"),
    (_edit("bogus", "x", 1), "[bogus]: unknown section"),
    (_edit("split", "share", "classifier"), "split.share: expected one of"),
    (_edit("split", "share", "none"), "split.share: the -share runs need a scope"),
    (_edit("split", "share_threshold", 1.5), "split.share_threshold: expected a fraction"),
    ({"run": {"model": "tiny"}, "federation": {"rounds": 1}}, "federation.num_clients: required"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_config_field_is_named(tmp_path: Path, sections: dict, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_toml(sections))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_cli_fails_fast_on_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_toml(_edit("fedavg", "local_epochs", "two")))
    out = tmp_path / "out"
    assert main(["compare", "--config", str(path), "--out", str(out)]) == 2
    assert "fedavg.local_epochs: expected a positive integer" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "broken.toml").write_text("[run\nmodel = ")
    assert main(["compare", "--config", str(tmp_path / "broken.toml"), "--out", str(out)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["compare", "--config", str(tmp_path / "missing.toml"), "--out", str(out)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_runs_option_selects_a_subset_and_names_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = load_spec(CONFIGS / "banking77-10tenants.toml")
    assert select_runs(spec, ["split-plain", " fedavg", "split-plain"]).runs == ["split-plain", "fedavg"]
    assert spec.runs[0] == "centralized"  # the loaded spec is left as it was
    out = tmp_path / "out"
    argv = ["compare", "--config", str(CONFIGS / "quick.toml"), "--out", str(out), "--runs", "split-plain,magic"]
    assert main(argv) == 2
    assert "--runs: ['magic'] not among this config's runs" in capsys.readouterr().err
    assert not out.exists()


def test_share_runs_carry_the_sharing_scope_and_are_named_by_it(tmp_path: Path) -> None:
    sections = _edit("split", "share", "tail")
    sections["split"]["share_threshold"] = 0.6
    sections["compare"] = {"runs": ["split-plain", "split-plain-share", "split-secure-client-share"]}
    path = tmp_path / "share.toml"
    path.write_text(_toml(sections))
    spec = load_spec(path)
    private, shared = federated_values(spec, "split-plain"), federated_values(spec, "split-plain-share")
    assert "share" not in private and shared["share"] == "tail" and shared["share-threshold"] == 0.6
    assert {k: v for k, v in shared.items() if not k.startswith("share")} == private
    secure = federated_values(spec, "split-secure-client-share")
    assert secure["security"] == "secure" and secure["label-protection"] == "client" and secure["share"] == "tail"
    config, settings, _ = parse_run_config("split", {**secure, "min-nodes": 2})
    assert run_name("split", config, None, settings.share) == "split-secure-client-share-tail"
    config, settings, _ = parse_run_config("split", {**private, "min-nodes": 2})
    assert run_name("split", config, None, settings.share) == "split-plain"
    assert load_spec(CONFIGS / "banking77-10tenants.toml").sharing == {"share": "head-tail"}


def test_compare_writes_all_runs_report_and_plots(small_banking: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(_toml(_base(small_banking)))
    out = tmp_path / "out"
    assert main(["compare", "--config", str(path), "--out", str(out), "--cpus", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[fedavg-lora] round 2/2" in printed and "[split-plain] round 2/2" in printed

    results = json.loads((out / "results.json").read_text())
    runs = {run["name"]: run for run in results["runs"]}
    expected = ["centralized-lora", "fedavg-lora", "split-plain"]
    assert [run["name"] for run in results["runs"]][:3] == expected
    assert not results["skipped"]
    assert [run["name"] for run in results["runs"]][3:] == ["split-secure-he", "split-secure-client"]
    for run in runs.values():
        assert RUN_KEYS <= set(run)
        assert run["config"]["seed"] == 0 and run["config"]["model"] == "tiny"
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["wall_seconds"] > 0
    central, fedavg, split = (runs[name] for name in expected)
    assert central["train_examples_processed"] == 320 * 2  # rounds x local_epochs epochs
    # same partitions and the same per-tenant test splits in both federated runs
    assert fedavg["per_tenant_test_examples"] == split["per_tenant_test_examples"]
    assert sorted(fedavg["per_tenant_test_examples"]) == ["tenant-0", "tenant-1"]
    assert sum(fedavg["per_tenant_test_examples"].values()) == 120
    assert [c["tenant"] for c in fedavg["clients"]] == [c["tenant"] for c in split["clients"]]
    assert fedavg["train_examples_processed"] == 320 * 2
    assert [r["round"] for r in fedavg["rounds"]] == [1, 2]  # no eval-initial
    assert [r["round"] for r in split["rounds"]] == [1, 2]
    assert split["round_trips_per_step"] == pytest.approx(0.6)  # 5 steps in one pack of 5: 3 stages
    assert 0.0 < split["flower_wait_fraction"] < 1.0 and fedavg["flower_wait_fraction"] is None
    assert 0 < fedavg["round_trips_per_step"] < 0.5 and central["round_trips_per_step"] == 0
    for run in (fedavg, split):
        assert run["bytes_per_client_per_round"] > 0 and run["client_cpu_seconds_per_sample"] > 0
        assert run["client_peak_rss_bytes"] > 0
        assert run["server_peak_rss_bytes"] > 100 * 2**20  # the ServerApp's process: torch and a model at least
    # split: the mean over tenants of each tenant's adapters on the whole test set
    assert 0.0 <= split["global_test_accuracy"] <= 1.0 and 0.0 <= fedavg["global_test_accuracy"] <= 1.0
    for run in (fedavg, split):
        assert 0.0 <= run["test_macro_f1"] <= 1.0 and 0.0 <= run["global_test_macro_f1"] <= 1.0
        assert sorted(run["per_tenant_macro_f1"]) == ["tenant-0", "tenant-1"]

    report = (out / "report.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in report
    rows = [line for line in report.splitlines()  # the main table's rows (other tables have other widths)
            if line.startswith("| ") and not line.startswith("| run ") and line.count("|") == len(COLUMNS) + 1]
    assert [row.split(" | ")[0][2:] for row in rows] == [run["name"] for run in results["runs"]]
    assert all(row.count("|") == len(COLUMNS) + 1 for row in rows)
    assert "split-secure-client" in report
    # secure runs: the same tenants and test splits; one step in flight per tenant, so a round trip
    # per client message of a step (11 with he, 10 with client label protection), plus one per
    # round to the dealer node (later steps' material is asked ahead, riding along)
    for name, per_step in (("split-secure-he", 10), ("split-secure-client", 10)):
        secure = runs[name]
        assert secure["per_tenant_test_examples"] == split["per_tenant_test_examples"]
        assert per_step < secure["round_trips_per_step"] < per_step + 1
        assert secure["global_test_accuracy"] is None and 0.0 <= secure["test_accuracy"] <= 1.0
    for name in ("accuracy_vs_round.png", "costs.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000

    # --resume: identical inputs reuse every run; a changed centralized epoch count reruns only it
    assert main(["compare", "--config", str(path), "--out", str(out), "--cpus", "1", "--resume"]) == 0
    assert capsys.readouterr().out.count("reused from") == 5
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    path.write_text(_toml({**_base(small_banking), "centralized": {"epochs": 1}}))
    assert main(["compare", "--config", str(path), "--out", str(out), "--cpus", "1", "--resume"]) == 0
    assert capsys.readouterr().out.count("reused from") == 4
    again = {run["name"]: run for run in json.loads((out / "results.json").read_text())["runs"]}
    assert again["centralized-lora"]["train_examples_processed"] == 320
    assert all(again[name] == run for name, run in runs.items() if name != "centralized-lora")


def test_resume_never_reuses_a_run_without_test_accuracy(tmp_path: Path) -> None:
    from flower_split.runs.compare import _earlier_runs, _saved_runs

    runs = [{"name": "split-plain", "inputs": {"a": 1}, "test_accuracy": None},
            {"name": "fedavg-lora", "inputs": {"a": 1}, "test_accuracy": 0.5},
            {"name": "centralized-lora", "test_accuracy": 0.9}]  # from a release without inputs
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    assert list(_earlier_runs(_saved_runs(tmp_path))) == ["fedavg-lora"]
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match="--resume: cannot read"):
        _saved_runs(tmp_path)


def test_resume_with_other_runs_keeps_the_earlier_ones(tmp_path: Path) -> None:
    """``compare --runs fedavg --resume`` into a comparison that holds a split run adds the FedAvg
    run and keeps the split one (it was silently dropped from results.json)."""
    from flower_split.runs.compare import _other_runs, _saved_runs

    runs = [{"name": "split-plain-share-all", "compare_run": "split-plain-share", "test_accuracy": 0.93},
            {"name": "fedavg-lora", "compare_run": "fedavg", "test_accuracy": 0.5},
            {"name": "centralized-lora", "test_accuracy": 0.9}]  # from a release without compare_run
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    assert [r["name"] for r in _other_runs(_saved_runs(tmp_path), ["fedavg"])] == [
        "split-plain-share-all", "centralized-lora"]
    assert _other_runs(_saved_runs(tmp_path / "absent"), ["fedavg"]) == []
    (tmp_path / "results.json").write_text(json.dumps({"runs": [1]}))
    with pytest.raises(ConfigError, match="--resume: cannot read"):
        _saved_runs(tmp_path)
