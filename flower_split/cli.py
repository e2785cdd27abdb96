"""Command line: ``flower-split train|simulate|compare ...``.

Every option maps onto a :class:`RunConfig` field; the config is validated before any model
or data is loaded, so a bad value fails in milliseconds with the field's name.

``train``     in process (no Flower): centralized LoRA or split.
``simulate``  a Flower simulation (Ray) of split or the FedAvg-LoRA family (:mod:`flower_split.runs.simulate`).
``compare``   centralized LoRA, the FedAvg-LoRA family, probes and split on the same partitions, from a TOML config,
              with a report and plots (:mod:`flower_split.runs.compare`).
``audit``     the leakage audit of a run recorded with ``train --audit`` (:mod:`flower_split.audit`).
``predict``   classify texts with a run's saved parties (:mod:`flower_split.runs.predict`).
``worker``    the long-lived tenant worker of a deployed SuperNode (:mod:`flower_split.apps.tenant_worker`).
``dealer-keygen``, ``share-keygen``, ``tls-certs``, ``node-keys``  key material of a deployment
              (docs/deployment.md: the secure-mode dealer's key pair, a tenant's sharing key
              pair, the SuperLink's CA and TLS certificate, the SuperNodes' authentication keys;
              :mod:`flower_split.runs.deploy_keys`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from flower_split.config import LABEL_PROTECTIONS, MODES, PRIVATE, QUICK, SECURITY_LEVELS, ConfigError, RunConfig, parse_set
from flower_split.data import DatasetError

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flower-split", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train in process (no Flower): centralized LoRA or split")
    train.add_argument("--mode", choices=MODES, default="split")
    train.add_argument("--security", choices=SECURITY_LEVELS, default=None, help="plain (default) or secure")
    train.add_argument("--label-protection", choices=LABEL_PROTECTIONS, default=None,
                       help="secure mode: he (CKKS-encrypted labels, default) or client (logits to the client only)")
    train.add_argument("--dataset", default="banking77", help="banking77, sst2 or a data directory")
    train.add_argument("--data-dir", default=None, help="directory holding the dataset's files")
    train.add_argument("--model", default=None, help="minilm (default), tiny, or a local HF model path")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    train.add_argument("--out", required=True,
                       help="output directory for results.json and (split) every party's state in OUT/state")
    add_presets(train, "tiny model, a few hundred samples: a smoke run in seconds")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="any other RunConfig field, e.g. --set lr_tail=0.2 (JSON values)")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--audit", action="store_true",
                       help="split mode: record the cloud's view into OUT and run the leakage audit (OUT/audit.json)")
    add_audit_options(train)

    simulate = commands.add_parser("simulate", help="Flower simulation (Ray) of split-plain or FedAvg-LoRA")
    simulate.add_argument("--strategy", choices=("split", "fedavg"), required=True)
    simulate.add_argument("--num-clients", type=int, required=True, help="number of tenants (SuperNodes)")
    simulate.add_argument("--rounds", type=int, required=True,
                          help="server rounds (the maximum with --set plateau_patience=N)")
    simulate.add_argument("--partition", default="dirichlet:0.5", help="iid, dirichlet:ALPHA or shards:N")
    simulate.add_argument("--out", required=True, help="output directory for results.json")
    add_presets(simulate, "tiny model, a few hundred samples, short rounds: a smoke run")
    simulate.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                          help="a RunConfig field or Flower setting, e.g. --set local_steps=20, "
                               "--set local_epochs=2, --set baseline=fedprox --set proximal_mu=0.01, "
                               "--set personalize_epochs=2 (fedavg) (JSON values)")
    simulate.add_argument("--cpus", type=int, default=None,
                          help="CPUs for Ray (default: all); each client uses one")

    compare = commands.add_parser("compare", help="centralized vs FedAvg-LoRA vs split, report and plots")
    compare.add_argument("--config", required=True, help="TOML file, e.g. simulations/configs/quick.toml")
    compare.add_argument("--out", required=True, help="output directory (results.json, report.md, PNGs)")
    compare.add_argument("--cpus", type=int, default=None, help="CPUs for Ray (default: all)")
    compare.add_argument("--runs", default=None,
                         help="comma-separated subset of the config's [compare] runs, e.g. split-plain,fedavg")
    compare.add_argument("--resume", action="store_true",
                         help="reuse runs of OUT/results.json whose inputs are identical (interrupted or extended comparisons)")
    audit = commands.add_parser("audit", help="leakage audit of a run recorded with `train --audit`")
    audit.add_argument("--run", required=True, help="run directory holding transcript.json (writes audit.json)")
    add_audit_options(audit)
    audit.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_predict_parser(commands)
    keygen = commands.add_parser("dealer-keygen", help="make the secure-mode dealer's long-term key pair")
    keygen.add_argument("--out", required=True, help="directory for dealer.key (0600, the dealer node's) and "
                                                     "dealer.pub (what every tenant pins)")
    add_deploy_parsers(commands)
    return parser


def add_presets(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """``--quick`` and ``--private``: named sets of values, applied before the explicit options."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--private", action="store_true",
                        help="the recommended secure setting: secure, client labels, frozen head (no label-"
                             "dependent value reaches the cloud; docs/PRIVACY.md); with --security plain the "
                             "same view for the cloud at plain's cost")


def add_deploy_parsers(commands: argparse._SubParsersAction) -> None:
    """``share-keygen``, ``tls-certs`` and ``node-keys``: a tenant's sharing keys, a deployment's
    TLS certificates and SuperNode keys."""
    share_keygen = commands.add_parser("share-keygen", help="make a tenant's key pair for cross-tenant sharing")
    share_keygen.add_argument("--out", required=True, help="directory for share.key (0600, the tenant's node config "
                                                           "share-key) and share.pub (what the other tenants pin: "
                                                           "share-peers)")
    certs = commands.add_parser("tls-certs", help="make a CA and the SuperLink's TLS certificate")
    certs.add_argument("--out", required=True, help="directory for ca.crt, ca.key, server.pem, server.key")
    certs.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP",
                       help="a DNS name or IP address the SuperLink is reached at (repeat; default: "
                            "localhost and 127.0.0.1)")
    node_keys = commands.add_parser("node-keys", help="make SuperNode authentication key pairs (P-384)")
    node_keys.add_argument("--out", required=True, help="directory for NAME (0600) and NAME.pub")
    node_keys.add_argument("names", nargs="+", help="one key pair per name, e.g. tenant-0 tenant-1 dealer")
    worker = commands.add_parser("worker", help="the long-lived tenant worker a SuperNode hands its messages to "
                                                "(node config worker-socket)")
    worker.add_argument("--socket", required=True, help="Unix socket path, in a directory only you can write")
    worker.add_argument("--max-runs", type=int, default=8, help="runs whose node state is kept in memory")


def add_predict_parser(commands: argparse._SubParsersAction) -> None:
    """``predict``: the split inference protocol over a text file, with a run's saved parties."""
    predict = commands.add_parser("predict", help="classify texts with the parties saved by `train --out`")
    predict.add_argument("--state", required=True, help="a `train --out` directory, or its state directory")
    predict.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    predict.add_argument("--out", required=True, help="JSON-lines output: text, label, probabilities")
    predict.add_argument("--tenant", default=None, help="tenant id (default: the only tenant saved)")
    predict.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    predict.add_argument("--top-k", type=int, default=5, help="probabilities of the K likeliest labels (0: all)")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    predict.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_audit_options(parser: argparse.ArgumentParser) -> None:
    """Options of the audit's attacks (shared by ``audit`` and ``train --audit``)."""
    parser.add_argument("--public-data", default="sst2",
                        help="public text the inverters train on: sst2 (default), a data directory, or 'none'")
    parser.add_argument("--public-dir", default=None, help="directory holding the public data set's files")
    parser.add_argument("--public-sentences", type=int, default=3000, help="public sentences for the inverters")
    parser.add_argument("--known-sequences", type=int, default=2,
                        help="sequences per step the alignment attack knows (besides [CLS]/[SEP]/[PAD])")


def run_audit_command(directory: str, args: argparse.Namespace) -> int:
    """Audit the transcript in ``directory``; print a summary line per leak point."""
    from flower_split.audit import AuditOptions, TranscriptError, audit_directory

    public = None if args.public_data == "none" else args.public_data
    options = AuditOptions(known_sequences=args.known_sequences, inverters=public is not None)
    try:
        path = audit_directory(directory, public, args.public_sentences, args.public_dir, options,
                               progress=not args.no_progress)
    except (TranscriptError, DatasetError) as exc:
        print(f"flower-split: audit: {exc}", file=sys.stderr)
        return 2
    for point, leak in json.loads(path.read_text())["leak_points"].items():
        if leak.get("seen") is False:
            print(f"{point}: not seen by the cloud")
            continue
        rates = ", ".join(f"{name} {'-' if attack['recovery'] is None else format(attack['recovery'], '.1%')}"
                          for name, attack in leak["attacks"].items())
        print(f"{point}: {rates} (chance {leak['chance']:.2%}, majority {leak['majority']:.1%})")
    print(f"-> {path}")
    return 0


def dealer_keygen(directory: str, sharing: bool = False) -> int:
    """Write a fresh dealer key pair (``sharing``: a tenant's sharing key pair); refuse to
    overwrite an existing one (others pinned it)."""
    from flower_split.flower.sharing_keys import KEY_FILES
    from flower_split.protocol.dealer_identity import PRIVATE_FILE, PUBLIC_FILE, new_identity, save_identity

    names = KEY_FILES if sharing else (PRIVATE_FILE, PUBLIC_FILE)
    if (Path(directory) / names[0]).exists():
        print(f"flower-split: {Path(directory) / names[0]} exists; others may have pinned its key, "
              "so it is not replaced (remove it first to make a new one)", file=sys.stderr)
        return 2
    private, public = save_identity(new_identity(), directory, names)
    if sharing:
        print(f"sharing key: {private} (keep it on the tenant's machine: node config share-key)\n"
              f"public key: {public} = {public.read_text().strip()} (the other tenants pin it: node config share-peers)")
    else:
        print(f"dealer key: {private} (keep it on the dealer's machine: node config dealer-key)\n"
              f"public key: {public} = {public.read_text().strip()} (every tenant pins it: node config "
              "dealer-public-key)")
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then --quick and --private, then explicit options, then --set; validated."""
    values: dict[str, object] = {**(QUICK if args.quick else {}), **(PRIVATE if args.private else {})}
    for name in ("mode", "security", "label_protection", "dataset", "data_dir", "model", "epochs",
                 "batch_size", "seed", "device"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    values.update(parse_set(args.set))
    return RunConfig.from_mapping(values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        from flower_split.runs.simulate import main_simulate

        return main_simulate(args)
    if args.command == "compare":
        from flower_split.runs.compare import main_compare

        return main_compare(args)
    if args.command == "audit":
        return run_audit_command(args.run, args)
    if args.command == "predict":
        from flower_split.runs.predict import main_predict

        return main_predict(args)
    if args.command in ("dealer-keygen", "share-keygen"):
        return dealer_keygen(args.out, sharing=args.command == "share-keygen")
    if args.command == "worker":
        from flower_split.apps.tenant_worker import run_worker

        return run_worker(args.socket, args.max_runs)
    if args.command in ("tls-certs", "node-keys"):
        from flower_split.runs.deploy_keys import main_node_keys, main_tls_certs

        try:
            return main_tls_certs(args.out, args.host) if args.command == "tls-certs" \
                else main_node_keys(args.out, args.names)
        except (FileExistsError, ValueError) as exc:
            print(f"flower-split: {exc}", file=sys.stderr)
            return 2
    try:
        config = config_from_args(args)
    except (ConfigError, TypeError) as exc:
        print(f"flower-split: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from flower_split.runs.local import train, write_results

    recorder = None
    if args.audit:
        from flower_split.audit import CloudViewRecorder

        recorder = CloudViewRecorder()
    state_dir = Path(args.out) / "state" if config.mode == "split" else None
    try:
        run = train(config, progress=not args.no_progress, recorder=recorder, state_dir=state_dir)
    except (DatasetError, FileNotFoundError, ConfigError) as exc:
        print(f"flower-split: {exc}", file=sys.stderr)
        return 2
    path = write_results(args.out, [run])
    print(f"{run['name']}: test accuracy {run['test_accuracy']:.4f}, macro-F1 {run['test_macro_f1']:.4f}, "
          f"{run['wall_seconds']:.1f} s -> {path}")
    if recorder is not None:
        recorder.save(args.out)
        return run_audit_command(args.out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
