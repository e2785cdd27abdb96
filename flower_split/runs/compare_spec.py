"""The comparison's TOML file: sections, validation and the :class:`CompareSpec` it becomes.

See :mod:`flower_split.runs.compare` for the file's format. The whole file is validated
before anything runs; an unknown section or key, or a bad value, fails with
``<file>: <section>.<key>: <reason>``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from flower_split.backends import compare_variants
from flower_split.config import ConfigError, RunConfig
from flower_split.flower.settings import FlowerSettings

SECTIONS = ("run", "federation", "centralized", "fedavg", "fedprox", "split", "compare")
# the FedAvg family (Flower's FedAvg / FedProx, local-only), the linear probes (reference rows), and
# the split runs: every security backend's variants (split-plain, split-secure-he, split-secure-client),
# each also with cross-tenant sharing under SecAgg+ (split-plain-share, ...; scope in [split] share)
FEDAVG_KINDS = {"fedavg": "fedavg", "fedprox": "fedprox", "local-only": "local-only"}
SHARE_SUFFIX = "-share"
RUN_KINDS = ("centralized", *FEDAVG_KINDS, "probes", *compare_variants(),
             *(f"{variant}{SHARE_SUFFIX}" for variant in compare_variants()))
DEFAULT_RUNS = ("centralized", "fedavg", *compare_variants())
FEDERATION_KEYS = {"num_clients", "rounds", "partition", "eval_every", "eval_initial", "reply_timeout", "global_eval"}
FEDAVG_KEYS = {"local_epochs", "rounds", "plateau_patience", "plateau_delta", "personalize_epochs"}
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
    # the FedAvg family: its rounds (the maximum, with a plateau rule), plateau rule, personalisation
    fedavg_rounds: int = 0
    fedavg_options: dict[str, Any] = field(default_factory=dict)
    proximal_mu: float = 0.0
    # the ``-share`` runs: Flower settings ``share`` (scope, never "none") and ``share-threshold``
    sharing: dict[str, Any] = field(default_factory=lambda: {"share": "head-tail"})

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

    run = _run_section(tables["run"], where)
    num_clients, rounds, partition, flower = _federation_section(tables["federation"], where)
    local_epochs, fedavg_rounds, fedavg_options, mu = _fedavg_sections(tables["fedavg"], tables["fedprox"],
                                                                       rounds, where)

    centralized = tables["centralized"]
    _only("centralized", centralized, {"epochs"}, where)
    epochs = _positive("centralized", "epochs", centralized.get("epochs", rounds * local_epochs), where)

    split = tables["split"]
    _only("split", split, {"local_steps", "micro_batches", "share", "share_threshold"}, where)
    local_steps = split.get("local_steps", "auto")
    if local_steps != "auto":
        _positive("split", "local_steps", local_steps, where)
    micro_batches = _positive("split", "micro_batches", split.get("micro_batches", 8), where)
    sharing = _sharing(split, where)

    compare = tables["compare"]
    _only("compare", compare, {"runs", "threads"}, where)
    threads = _positive("compare", "threads", compare.get("threads", 1), where)
    runs = compare.get("runs", list(DEFAULT_RUNS))
    if not isinstance(runs, list) or not runs or not all(r in RUN_KINDS for r in runs):
        raise ConfigError(f"{where}: compare.runs: expected a non-empty list of {RUN_KINDS}, got {runs!r}")
    return CompareSpec(where, run, num_clients, rounds, partition, flower, epochs, local_epochs,
                       local_steps, micro_batches, list(dict.fromkeys(runs)), threads, raw,
                       fedavg_rounds, fedavg_options, mu, sharing)


def _sharing(split: dict[str, Any], where: str) -> dict[str, Any]:
    """``[split] share`` / ``share_threshold``: the Flower settings of the ``-share`` runs."""
    sharing = {"share": split.get("share", "head-tail")}
    if "share_threshold" in split:
        sharing["share_threshold"] = split["share_threshold"]
    if sharing["share"] == "none":
        raise ConfigError(f"{where}: split.share: the -share runs need a scope other than 'none'")
    try:
        FlowerSettings(**sharing).validate()
    except ConfigError as exc:
        name, _, reason = str(exc).partition(":")
        raise ConfigError(f"{where}: split.{name.replace('-', '_')}:{reason}") from None
    return sharing


def _run_section(run: dict[str, Any], where: str) -> dict[str, Any]:
    """``[run]``: RunConfig fields shared by every run, validated."""
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
    return run


def _federation_section(federation: dict[str, Any], where: str) -> tuple[int, int, str, dict[str, Any]]:
    """``[federation]``: (num_clients, rounds, partition, the optional Flower settings), validated."""
    _only("federation", federation, FEDERATION_KEYS, where)
    for key in ("num_clients", "rounds"):
        if key not in federation:
            raise ConfigError(f"{where}: federation.{key}: required")
    num_clients = _positive("federation", "num_clients", federation["num_clients"], where)
    rounds = _positive("federation", "rounds", federation["rounds"], where)
    partition = federation.get("partition", "iid")
    flower = {k: federation[k] for k in ("eval_every", "eval_initial", "reply_timeout", "global_eval")
              if k in federation}
    try:
        FlowerSettings(num_server_rounds=rounds, partition=partition, min_nodes=num_clients, **flower).validate()
    except ConfigError as exc:
        name, _, reason = str(exc).partition(":")
        raise ConfigError(f"{where}: federation.{name.replace('-', '_')}:{reason}") from None
    return num_clients, rounds, partition, flower


def _fedavg_sections(fedavg: dict[str, Any], fedprox: dict[str, Any], rounds: int,
                     where: str) -> tuple[int, int, dict[str, Any], float]:
    """``[fedavg]`` and ``[fedprox]``: (local_epochs, the family's rounds, plateau and personalisation
    options, FedProx's mu), validated."""
    from flower_split.flower.fedavg_settings import FedAvgSettings

    _only("fedavg", fedavg, FEDAVG_KEYS, where)
    _only("fedprox", fedprox, {"mu"}, where)
    local_epochs = _positive("fedavg", "local_epochs", fedavg.get("local_epochs", 1), where)
    fedavg_rounds = _positive("fedavg", "rounds", fedavg.get("rounds", rounds), where)
    options = {k: fedavg[k] for k in ("plateau_patience", "plateau_delta", "personalize_epochs") if k in fedavg}
    mu = fedprox.get("mu", 0.0)
    for section, values in (("fedavg", options), ("fedprox", {"baseline": "fedprox", "proximal_mu": mu})):
        try:
            FedAvgSettings(local_epochs=local_epochs, **values).validate()
        except ConfigError as exc:
            name, _, reason = str(exc).partition(":")
            key = "mu" if name == "proximal-mu" else name.replace("-", "_")
            raise ConfigError(f"{where}: {section}.{key}:{reason}") from None
    return local_epochs, fedavg_rounds, options, float(mu)


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


def select_runs(spec: CompareSpec, names: list[str]) -> CompareSpec:
    """``spec`` with only the runs ``names`` (each one of the config's ``[compare] runs``)."""
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in spec.runs]
    if not names or unknown:
        raise ConfigError(f"--runs: {unknown or names!r} not among this config's runs {spec.runs}")
    return replace(spec, runs=list(dict.fromkeys(names)))
