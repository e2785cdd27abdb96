"""``flower-split simulate``: run split-plain or FedAvg-LoRA as a Flower simulation (Ray backend).

The same ServerApp/ClientApp code as a deployment (``flower_split.apps.server_app`` /
``client_app`` for split, ``fedavg_server_app`` / ``fedavg_client_app`` for FedAvg-LoRA) runs
under :func:`flwr.simulation.run_simulation` with ``num_clients`` virtual SuperNodes. Every
client handler is wrapped in :func:`flower_split.flower.metering.cost_mod` and the ServerApp's grid in
:class:`flower_split.flower.metering.MeteredGrid`, so both strategies are measured the same way
(bytes per node from ArrayRecord sizes, client CPU seconds, client peak RSS).

The result is one ``results.json`` run entry with the fields of ``flower-split train``
(:func:`flower_split.api.train`) plus ``global_test_accuracy``, ``rounds`` (per-round accuracy,
loss and bytes per client) and ``clients`` (per-tenant costs); see :func:`simulate`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from flower_split.backends import backend_for, get_backend
from flower_split.config import ConfigError, RunConfig
from flower_split.flower.metering import PeakRss, cost_mod
from flower_split.flower.node_state import STATE_DIR_ENV
from flower_split.flower.state_spill import SPILL_ENV
from flower_split.flower.results import Collector, run_entry
from flower_split.flower.settings import FlowerSettings, settings_from_run_config, shared_run_name

STRATEGIES = ("split", "fedavg")


def parse_run_config(strategy: str, run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings, Any]:
    """Validate ``run_config`` for ``strategy``: (RunConfig, FlowerSettings, FedAvgSettings or None)."""
    if strategy == "split":
        config, settings = settings_from_run_config(run_config)
        backend_for(config, settings)
        return config, settings, None
    if strategy == "fedavg":
        from flower_split.flower.fedavg_client_app import fedavg_settings_from_run_config

        return fedavg_settings_from_run_config(run_config)
    raise ConfigError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")


def run_name(strategy: str, config: RunConfig, fedavg: Any = None, share: str = "none") -> str:
    """The FedAvg-family baseline's name (``fedavg-lora``, ``fedprox-lora``, ``local-lora``), or the
    split run's from its backend (``split-plain``, ``split-secure-he`` ...) and sharing scope."""
    if strategy == "split":
        return shared_run_name(get_backend(config.security).run_name(config), share)
    return fedavg.run_name if fedavg is not None else "fedavg-lora"


def simulate(strategy: str, run_config: Mapping[str, Any], num_clients: int, *, progress: bool = True,
             cpus: int | None = None) -> dict:
    """Run one Flower simulation and return its ``results.json`` run entry.

    ``run_config``: Flower ``run_config`` keys of the chosen apps (RunConfig fields, FlowerSettings
    such as ``num-server-rounds`` / ``partition`` / ``local-steps``, and for FedAvg
    ``local-epochs``); ``min-nodes`` defaults to ``num_clients``. ``cpus``: CPUs Ray may use
    (default: all); each client takes one, so that many clients train at a time.
    """
    from flwr.simulation import run_simulation

    if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
        raise ConfigError(f"num-clients: expected a positive integer, got {num_clients!r}")
    values = {"min-nodes": num_clients, **dict(run_config)}
    config, settings, fedavg = parse_run_config(strategy, values)  # fail fast, before Ray starts
    if settings.min_nodes > num_clients:
        raise ConfigError(f"min-nodes: {settings.min_nodes} tenants required but only {num_clients} simulated")
    name = run_name(strategy, config, fedavg, settings.share if fedavg is None else "none")
    secure = strategy == "split" and get_backend(config.security).name == "secure"
    dealer_node = secure and not settings.insecure_colocated_dealer
    if dealer_node:  # the dealer is a simulated node of its own (docs/secure.md §9)
        values["simulated-dealer"] = True
    nodes = num_clients + int(dealer_node)
    global_model = fedavg is None or fedavg.baseline != "local-only"
    collector = Collector(name, strategy, settings, nodes, progress, warm_up=warm_up, global_model=global_model)
    collected = collector.collected
    server_app, client_app = _apps(strategy, values, collector.on_report, collector.wrap, collector)
    cpus = cpus or os.cpu_count() or 1
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": _client_gpus(config, cpus)},
                      "init_args": {"num_cpus": cpus, "include_dashboard": False}}
    started = time.perf_counter()
    sharing = fedavg is None and settings.share != "none"
    # a FedAvg-family run that saves its state (run config state-dir): the simulated nodes mirror
    # theirs there too (a local-only tenant's model), as a deployed node does with its node config
    node_state = os.path.abspath(settings.state_dir) if fedavg is not None and settings.state_dir else ""
    with simulated_node_keys(dealer_node, unpinned=secure and not dealer_node, unpinned_sharing=sharing), \
            _environment(STATE_DIR_ENV, node_state), _spill_directory(secure), \
            PeakRss() as server_rss:  # the ServerApp runs in this process, next to the simulation engine
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                       backend_config=backend_config)
    collected.server_peak_rss_bytes = server_rss.peak
    total_wall = time.perf_counter() - started
    if collected.grid is None or not collected.rounds:
        raise RuntimeError(f"{name}: the simulation produced no training round (see the log above)")
    return run_entry(name, strategy, config, settings, fedavg, num_clients, collected, total_wall)


WARM_UP = "query.warmup"


@contextlib.contextmanager
def _spill_directory(secure: bool) -> Iterator[None]:
    """A secure run's tenants keep their large state tensors in a private temporary directory
    (:mod:`flower_split.flower.state_spill`), deleted with everything in it when the run ends;
    an environment that sets ``FLOWER_SPLIT_STATE_SPILL`` itself (``off``: none) keeps its own."""
    if not secure or SPILL_ENV in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="flower-split-spill-") as directory, _environment(SPILL_ENV, directory):
        yield


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment (inherited by Ray's workers) while the block
    runs, when ``value`` is not empty; the previous value afterwards."""
    if not value:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def simulated_node_keys(enabled: bool, unpinned: bool = False, unpinned_sharing: bool = False) -> Iterator[None]:
    """The trust settings of one simulation's nodes, handed to them by environment.

    Simulated nodes have no node config of their own, so the dealer node finds its key file
    and the tenants the key they pin in ``FLOWER_SPLIT_DEALER_KEY`` /
    ``FLOWER_SPLIT_DEALER_PUBLIC_KEY`` (a fresh key pair; set before Ray starts its workers,
    restored after). The ServerApp never reads them. In a deployment each machine has its own
    node config. ``unpinned`` (a run that co-locates the dealer, insecure): the tenants instead
    get ``FLOWER_SPLIT_ALLOW_UNPINNED_DEALER=1``, the opt-in a tenant must give itself.
    ``unpinned_sharing`` (a run that shares): ``FLOWER_SPLIT_ALLOW_UNPINNED_SHARING=1``, every
    tenant takes part in SecAgg+ without pinned sharing keys (in a simulation every party runs
    in one process tree; a deployment pins them: docs/secure.md §10).
    """
    from flower_split.flower.dealer_node import DEALER_KEY_ENV, DEALER_PUBLIC_ENV, UNPINNED_ENV
    from flower_split.flower.sharing_keys import UNPINNED_SHARING_ENV
    from flower_split.protocol.dealer_identity import new_identity, save_identity

    names = (DEALER_KEY_ENV, DEALER_PUBLIC_ENV, UNPINNED_ENV, UNPINNED_SHARING_ENV)
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="flower-split-dealer-") as directory:
        if enabled:
            private, public = save_identity(new_identity(), directory)
            os.environ[DEALER_KEY_ENV], os.environ[DEALER_PUBLIC_ENV] = str(private), str(public)
        if unpinned:
            os.environ[UNPINNED_ENV] = "1"
        if unpinned_sharing:
            os.environ[UNPINNED_SHARING_ENV] = "1"
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def warm_up(grid: Grid, num_clients: int, timeout: float) -> None:
    """Wait for ``num_clients`` nodes and have each load its model and data (``query.warmup``).

    Keeps start-up (Ray actors, imports, model loading, tokenization) out of the first round's
    wall time; the ClientApps' cost meter reports the loading as setup CPU.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {num_clients} clients connected within {timeout} s")
        time.sleep(0.2)
    messages = [Message(RecordDict(), dst_node_id=node, message_type=WARM_UP) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failures = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
    if failures or len(replies) < len(messages):
        raise RuntimeError(f"warm-up failed ({len(replies)} of {len(messages)} replies): {'; '.join(failures)}")


def _add_warm_up(client_app: Any) -> Any:
    """Register the ``query.warmup`` handler (the cost mod's ``prepare`` does the loading)."""

    @client_app.query("warmup")
    def warmup(message: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=message)

    return client_app


def _client_gpus(config: RunConfig, cpus: int) -> float:
    import torch

    if config.device == "cpu" or not torch.cuda.is_available():
        return 0.0
    return 1.0 / cpus  # share the GPU among the clients running at once


def _apps(strategy: str, values: Mapping[str, Any], on_report: Callable[[Any], None],
          wrap: Callable[[Grid], Grid], journal: Any = None) -> tuple[ServerApp, Any]:
    overrides = dict(values)
    if strategy == "fedavg":
        from flower_split.flower.fedavg_client_app import make_fedavg_client_app, prepare
        from flower_split.flower.fedavg_server_app import make_fedavg_server_app

        mod = cost_mod(lambda context: prepare(context, overrides))
        return (make_fedavg_server_app(overrides, on_report, wrap, journal),
                _add_warm_up(make_fedavg_client_app(overrides, mods=[mod])))

    from flower_split.apps.client_app import make_client_app
    from flower_split.apps.server_app import run_cloud
    from flower_split.flower.dealer_node import TENANT_ROLE, node_role
    from flower_split.flower.tenant import tenant_data

    def prepare_split(context: Context) -> None:
        config, settings = settings_from_run_config({**dict(context.run_config), **overrides})
        if node_role(context.node_config, settings) == TENANT_ROLE:  # the dealer node loads no data
            tenant_data(config, settings, context.node_config)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cloud(wrap(grid), {**dict(context.run_config), **overrides}, on_report)

    return server_app, _add_warm_up(make_client_app(overrides, mods=[cost_mod(prepare_split)]))


def quick_values() -> dict[str, Any]:
    """What ``--quick`` sets: the CLI's tiny model on a few hundred samples, short rounds."""
    from flower_split.config import QUICK
    from flower_split.flower.settings import QUICK_FLOWER

    return {**{k: v for k, v in QUICK.items() if k != "epochs"}, **QUICK_FLOWER}


def main_simulate(args: Any) -> int:
    """The ``simulate`` subcommand (``args`` from :func:`flower_split.cli.build_parser`)."""
    from flower_split.runs.local import write_results
    from flower_split.config import parse_set
    from flower_split.data import DatasetError

    try:
        values: dict[str, Any] = quick_values() if args.quick else {}
        if getattr(args, "private", False):
            from flower_split.config import PRIVATE
            values.update(PRIVATE)
        values.update(parse_set(args.set))
        values.update({"num_server_rounds": args.rounds, "partition": args.partition})
        values = {key.replace("_", "-"): value for key, value in values.items()}
        parse_run_config(args.strategy, {"min-nodes": args.num_clients, **values})
    except (ConfigError, TypeError) as exc:
        print(f"flower-split: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        run = simulate(args.strategy, values, args.num_clients, cpus=args.cpus)
    except (DatasetError, FileNotFoundError, ConfigError) as exc:
        print(f"flower-split: {exc}", file=sys.stderr)
        return 2
    path = write_results(args.out, [run])
    print(f"{run['name']}: per-tenant accuracy {_fmt(run['test_accuracy'])}, global test accuracy "
          f"{_fmt(run['global_test_accuracy'])}, {run['wall_seconds']:.1f} s -> {path}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
