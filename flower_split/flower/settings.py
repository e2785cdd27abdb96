"""Flower run settings: Flower's ``run_config`` -> a validated :class:`RunConfig` + :class:`FlowerSettings`.

``run_config`` keys use dashes (``lr-head``) or underscores; the keys that are not
:class:`RunConfig` fields are the Flower-only settings of :class:`FlowerSettings`. Unknown
keys are an error naming the key, so a misspelt option never silently does nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from flower_split.config import PRIVATE, QUICK, ConfigError, RunConfig

# with ``private``: no evaluation counts to the cloud (per-class counts of a batch of one name its
# label), no cross-tenant sharing (the cloud learns the average of label-trained adapters)
PRIVATE_FLOWER = {"secure_metrics": False, "share": "none"}

SHARE_SCOPES = ("none", "tail", "head-tail", "all")
FINE_TUNED_COPY = frozenset({"all"})
"""Scopes that share nothing after the last round: each tenant's final model is its own fine-tuned
copy of the average (the personal part, when the classifier is shared too)."""
"""Run config ``share``: no sharing, the tail adapter, head and tail adapters (the classifier stays
personal), or everything with the classifier (each tenant keeps its last round's fine-tuned copy)."""



STEP_PACES = ("auto", "lockstep", "stream")


def shared_run_name(name: str, share: str) -> str:
    """A split run's name with its sharing scope (``split-plain-share-tail``); unchanged without."""
    return name if share == "none" else f"{name}-share-{share}"


# ``quick = true`` (``flwr run . --run-config quick=true``, ``simulate --quick``): short rounds too
QUICK_FLOWER = dict(local_steps=10, micro_batches=5)


@dataclass
class FlowerSettings:
    """Settings of a Flower run that are not part of :class:`RunConfig`.

    ``run_config`` keys (dashes): ``num-server-rounds``, ``local-steps`` (micro-batches each
    tenant trains per round), ``micro-batches`` (micro-batches carried per Flower message),
    ``partition`` (``iid``, ``dirichlet:A``, ``shards:N``), ``min-nodes`` (tenants needed to
    start), ``reply-timeout`` (seconds to wait for a stage's replies; tenants later than that
    are dropped from the round), ``node-wait-timeout`` (seconds a round waits for ``min-nodes``
    tenants to be connected and set up, and in secure mode for the dealer node, before the
    run fails), ``eval-every`` (evaluate every N rounds; 0: only at the end),
    ``eval-initial`` (also evaluate before the first round), ``global-eval`` (after the last
    round, also evaluate every tenant on the whole test set; split only), ``secure-metrics``
    (tenants report their evaluation counts to the strategy, in secure mode from logits opened
    to them only; false: they report none, and split-plain tenants keep their training losses
    too. A secure tenant never reports a training loss, see docs/secure.md §9),
    ``he-key-rotation-every`` (secure mode with ``he`` label protection: every tenant gets a
    new CKKS key pair after every N training rounds; 0: never; any other mode refuses N > 0),
    ``cloud-keep-graphs`` (both modes: the cloud keeps each in-flight step's autograd graph,
    about 200 MB per 32-row MiniLM micro-batch, instead of running the body forward again when
    the gradient arrives; faster, but memory grows with tenants x micro-batches),
    ``allow-insecure-reproducible-init`` (secure mode, the cloud: accept tenants whose adapters
    start from the public seed, ``insecure-reproducible-init``; benchmarks only, default false),
    ``target-loss`` (the stop rule: a tenant whose own mean training loss of a round is <= this
    value gets no more training rounds but is still evaluated; the round it stopped is
    recorded; 0: never stop. Split-plain only: the cloud applies it to the losses tenants
    report. Secure: refused; each tenant sets its own in node config ``target-loss`` and
    applies it itself, :mod:`flower_split.flower.stop_rule`),
    ``insecure-colocated-dealer`` (secure mode: run the dealer inside the ServerApp, so the
    cloud holds every tenant's Beaver material and can open everything; tests and demos only,
    warned every round; only tenants whose own node config says ``allow-unpinned-dealer``
    accept its unsigned hello. Off
    (default): the dealer is its own SuperNode, node config ``role = "dealer"``),
    ``expected-dealer-key`` (secure mode, the cloud's own pin of the dealer: 64 hex digits or a
    ``dealer.pub`` path; public. A node claiming the dealer role under another key, or whose
    hellos do not verify, is refused. Empty: the first dealer node is taken; tenants verify
    against their own pins either way),
    ``simulated-dealer`` (simulation, which has no per-node config: the node with the last
    ``partition-id`` is the dealer and the tenants split the data ``num-partitions - 1`` ways;
    ``flower-split simulate`` sets it for secure runs),
    ``labels`` (the run's label set for tenants that train on their own files, node config
    ``data-path``: comma-separated names; empty (default): the labels of ``dataset``; see
    :mod:`flower_split.flower.node_data`),
    ``results-dir`` (the ServerApp writes ``results.json`` there after the run, atomically,
    in the format of ``flower-split simulate``; a path on the ServerApp's machine; empty
    (default): none, a deployment's only record is then the log),
    ``state-dir`` (the ServerApp saves the cloud's state there after every round, and resumes
    from it: :mod:`flower_split.flower.cloud_state`; the FedAvg family's ServerApp its global
    model and history: :mod:`flower_split.flower.fedavg_checkpoint`; a path on the ServerApp's machine; empty
    (default): nothing saved), ``session`` (the name of the run's saved state, under the
    cloud's ``state-dir`` and every node's own node config ``state-dir``; start a run with the
    session of a stopped one to resume it; empty (default): ``run-<run id>``, a fresh one),
    ``predict`` (train nothing: resume the trained ``session`` from ``state-dir`` and classify
    every tenant's own texts, node config ``predict-input``, into its own ``predict-output``;
    :mod:`flower_split.flower.node_predict`),
    ``channel-address`` (deployment: ``HOST:PORT`` where the ServerApp listens for its direct
    channel to the tenants' workers, reachable from every tenant machine; messages then bypass
    Flower's polling, :mod:`flower_split.flower.direct_channel`; port 0: any free port; empty
    (default): every message goes through Flower), ``channel-advertise`` (``HOST:PORT`` the
    tenants' workers are told to connect to, when they reach the listener by another address
    than ``channel-address``: NAT, a container's published port; empty (default): the
    listening address),
    ``share`` (opt-in cross-tenant sharing, :mod:`flower_split.flower.sharing_server`: after
    every training round the chosen adapter parameters are averaged across the round's tenants
    under Flower's SecAgg+, each tenant keeping the rest (its classifier) personal; ``none``
    (default), ``tail`` (the tail adapter without the classifier), ``head-tail`` (head and
    tail adapters: everything but the classifier) or ``all`` (the classifier too, after every
    round but the last: each tenant keeps the copy it fine-tuned in the last round); docs/secure.md §10),
    ``share-threshold`` (SecAgg+'s reconstruction threshold as a fraction of the tenants in the
    aggregation, at least 2 of them: the aggregate survives up to ``n - max(2, round(f * n))``
    drop-outs; default 0.5),
    ``step-pace`` (secure steps: ``lockstep``, every tenant's message of a stage sent and
    answered together; ``stream``, each tenant at its own pace, its reply answered as soon as
    it arrives, :mod:`flower_split.flower.stream`; ``auto`` (default): lockstep where every
    party shares the ServerApp's machine (Flower's simulation, the in-process grid), stream
    otherwise (a deployment: the tenants compute on their own machines)),
    ``quick`` (tiny model on a few hundred samples and short rounds: ``flower_split.config.QUICK``
    and :data:`QUICK_FLOWER`), ``private`` (the recommended secure setting,
    ``flower_split.config.PRIVATE``; a tenant insists on it, or on split-plain with a frozen head
    and ``secure-metrics`` false, with its node config ``private``).
    """

    num_server_rounds: int = 3
    local_steps: int = 50
    micro_batches: int = 8
    partition: str = "dirichlet:0.5"
    min_nodes: int = 2
    reply_timeout: float = 600.0
    node_wait_timeout: float = 600.0
    eval_every: int = 1
    eval_initial: bool = False
    global_eval: bool = True
    secure_metrics: bool = True
    he_key_rotation_every: int = 0
    cloud_keep_graphs: bool = False
    allow_insecure_reproducible_init: bool = False
    target_loss: float = 0.0
    insecure_colocated_dealer: bool = False
    expected_dealer_key: str = ""
    simulated_dealer: bool = False
    labels: str = ""
    results_dir: str = ""
    state_dir: str = ""
    session: str = ""
    predict: bool = False
    channel_address: str = ""
    channel_advertise: str = ""
    share: str = "none"
    share_threshold: float = 0.5
    step_pace: str = "auto"
    quick: bool = False
    private: bool = False

    def validate(self) -> "FlowerSettings":
        for name in ("num_server_rounds", "local_steps", "micro_batches", "min_nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')}: expected a positive integer, got {value!r}")
        for name in ("eval_every", "he_key_rotation_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name.replace('_', '-')}: expected an integer >= 0, got {value!r}")
        for name in ("reply_timeout", "node_wait_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')}: expected a positive number of seconds, got {value!r}")
        if isinstance(self.target_loss, bool) or not isinstance(self.target_loss, (int, float)) \
                or not self.target_loss >= 0:
            raise ConfigError(f"target-loss: expected a number >= 0 (0: never stop), got {self.target_loss!r}")
        for name in ("eval_initial", "global_eval", "secure_metrics", "cloud_keep_graphs",
                     "allow_insecure_reproducible_init", "insecure_colocated_dealer", "simulated_dealer", "quick",
                     "private", "predict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name.replace('_', '-')}: expected true or false, got {getattr(self, name)!r}")
        for name in ("expected_dealer_key", "partition", "labels", "results_dir", "state_dir", "session",
                     "channel_address", "channel_advertise"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name.replace('_', '-')}: expected a string, got {getattr(self, name)!r}")
        for key, value in (("channel-address", self.channel_address), ("channel-advertise", self.channel_advertise)):
            host, sep, port = value.rpartition(":")
            if value and not (sep and host and port.isdigit() and int(port) < 65536):
                raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
        if self.channel_advertise and not self.channel_address:
            raise ConfigError("channel-advertise: set channel-address too (where the ServerApp listens)")
        if self.step_pace not in STEP_PACES:
            raise ConfigError(f"step-pace: expected one of {', '.join(STEP_PACES)}, got {self.step_pace!r}")
        if self.share not in SHARE_SCOPES:
            raise ConfigError(f"share: expected one of {', '.join(SHARE_SCOPES)}, got {self.share!r}")
        if isinstance(self.share_threshold, bool) or not isinstance(self.share_threshold, (int, float)) \
                or not 0 < self.share_threshold <= 1:
            raise ConfigError(f"share-threshold: expected a fraction in (0, 1], got {self.share_threshold!r}")
        if self.share in FINE_TUNED_COPY and self.num_server_rounds < 2:
            raise ConfigError(f"share: {self.share!r} shares after every round but the last, so a run of "
                              f"{self.num_server_rounds} round shares nothing; use num-server-rounds >= 2")
        from flower_split.data import make_partitioner  # validates the spec's syntax

        make_partitioner(self.partition, 2, 0)
        return self

    def session_name(self, run_id: int) -> str:
        """Run config ``session``, or ``run-<run id>`` (a fresh session per run)."""
        return self.session or f"run-{run_id}"

    @property
    def total_steps(self) -> int:
        """Optimizer steps each tenant takes over the whole run (for the LR schedule)."""
        return self.num_server_rounds * self.local_steps


def settings_from_run_config(values: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings]:
    """Split Flower's ``run_config`` into a validated :class:`RunConfig` and :class:`FlowerSettings`.

    Keys may use dashes or underscores; unknown keys are an error naming the key. The
    Flower apps run ``mode='split'``; the security level's own rules are its backend's
    (:func:`flower_split.backends.backend_for`).
    """
    flower_fields = {f.name for f in dataclasses.fields(FlowerSettings)}
    run: dict[str, Any] = {}
    flower: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        (flower if name in flower_fields else run)[name] = value
    for name in ("max_train_samples", "max_test_samples"):  # TOML has no None: 0 means all rows
        if run.get(name) == 0 and not isinstance(run.get(name), bool):
            run[name] = None
    quick = flower.get("quick", False)
    if quick is True:  # applied last so that `--run-config quick=true` wins over pyproject defaults
        run.update({k: v for k, v in QUICK.items() if k != "epochs"})
        flower.update(QUICK_FLOWER)
    if flower.get("private", False) is True:  # the recommended secure setting; a tenant enforces it by node config
        run.update(PRIVATE)
        flower.update(PRIVATE_FLOWER)
    settings = FlowerSettings(**flower).validate()
    config = RunConfig.from_mapping(run)
    if config.mode != "split":
        raise ConfigError(f"mode: the Flower app runs 'split' only, got {config.mode!r}")
    return config, settings
