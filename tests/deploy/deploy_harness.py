"""A real Flower deployment on localhost for tests: SuperLink, SuperNodes, the ``flwr`` CLI.

Every process runs in a session of its own (its own process group) with its own
``FLWR_HOME`` and log file under the harness's directory, and :meth:`LocalFederation.stop`
ends each group (SIGTERM, then SIGKILL) — also the ClientApp and SuperExec processes a
SuperNode spawned. TLS with a throw-away CA (:func:`flower_split.runs.deploy_keys.make_tls_certs`),
SuperNode authentication (``--enable-supernode-auth``, ``flwr supernode register``) and no
runtime dependency installation (``--disable-runtime-dependency-installation``): the
commands of docs/deployment.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flower_split.runs.deploy_keys import make_node_keys, make_tls_certs

ROOT = Path(__file__).resolve().parents[2]
BINARIES = ("flower-superlink", "flower-supernode", "flwr")
CONNECTION = "local-tls"
LABELS = ("card_arrival", "exchange_rate", "top_up_failed")
WORDS = {"card_arrival": "when will my new card arrive", "exchange_rate": "what exchange rate do you use",
         "top_up_failed": "my top up did not work"}


def tenant_csv(directory: Path, tenant: int, rows: int = 40) -> Path:
    """A tenant's own labelled texts over :data:`LABELS` (never in the FAB, never on another machine)."""
    path = directory / f"tenant-{tenant}.csv"
    lines = ["text,category"] + [f"{WORDS[LABELS[(i + tenant) % 3]]} {i},{LABELS[(i + tenant) % 3]}"
                                 for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def binary(name: str) -> str | None:
    """``name`` next to this Python (a virtual environment's bin), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if binary(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class LocalFederation:
    """One SuperLink and any number of SuperNodes on 127.0.0.1, all stopped by :meth:`stop`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[Process] = []
        self.certs = make_tls_certs(directory / "certs")
        self.cli_home = directory / "cli-home"
        self.cli_home.mkdir(parents=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs["ca.crt"]}"\n')

    def env(self, home: Path) -> dict[str, str]:
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": pythonpath,
                "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    # -- processes ------------------------------------------------------------------------------

    def start(self, name: str, args: list[str]) -> Process:
        home = self.dir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        log = self.dir / f"{name}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen([binary(args[0]) or args[0], *args[1:]], stdout=handle, stderr=subprocess.STDOUT,
                                     env=self.env(home), cwd=home, start_new_session=True)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_superlink(self, timeout: float = 60.0) -> Process:
        link = self.start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.certs["ca.crt"]),
            "--ssl-certfile", str(self.certs["server.pem"]), "--ssl-keyfile", str(self.certs["server.key"]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port)])
        self.wait_for(link, "Uvicorn running on https://", timeout)
        return link

    def node_keys(self, *names: str) -> dict[str, tuple[Path, Path]]:
        return make_node_keys(self.dir / "keys", names)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI against this federation's SuperLink (TLS, the CA of this federation)."""
        return subprocess.run([binary("flwr") or "flwr", *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env(self.cli_home), cwd=self.dir)

    def register(self, public_key: Path) -> int:
        done = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {done.stdout}\n{done.stderr}")
        return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])

    def start_supernode(self, name: str, private_key: Path, node_config: str, *extra: str) -> Process:
        return self.start(name, [
            "flower-supernode", "--superlink", self.address, "--root-certificates", str(self.certs["ca.crt"]),
            "--auth-supernode-private-key", str(private_key), "--node-config", node_config,
            "--port", str(free_port()), *extra])

    def start_worker(self, name: str, timeout: float = 120.0) -> tuple[Process, str]:
        """``flower-split worker`` for node ``name`` (docs/deployment.md §10); its socket path,
        for the node's ``worker-socket``, once it listens."""
        sockets = self.dir / "sockets"
        sockets.mkdir(mode=0o700, exist_ok=True)
        path = sockets / f"{name}.sock"
        command = ["flower-split"] if binary("flower-split") else [sys.executable, "-m", "flower_split.cli"]
        worker = self.start(f"worker-{name}", [*command, "worker", "--socket", str(path)])
        self.wait_for(worker, "tenant worker listening on", timeout)
        return worker, str(path)

    def wait_for(self, process: Process, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, process.text())
            if match:
                return match
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited ({process.popen.returncode}) before {pattern!r}:\n"
                                   f"{process.text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{process.name}: no {pattern!r} within {timeout} s:\n{process.text()[-3000:]}")

    def online_nodes(self) -> int:
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if done.returncode != 0:
            return 0
        nodes = json.loads(done.stdout[done.stdout.index("{"):]).get("nodes", [])
        return sum(1 for node in nodes if node.get("status") == "online")

    def kill(self, process: Process) -> None:
        """SIGKILL the process group: the node vanishes as if its machine died."""
        _signal_group(process.popen, signal.SIGKILL)
        process.popen.wait(timeout=30)

    def stop_one(self, process: Process) -> None:
        """SIGTERM one process group (a SuperNode leaving cleanly), SIGKILL after 20 s."""
        _signal_group(process.popen, signal.SIGTERM)
        try:
            process.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process.popen, signal.SIGKILL)

    def stop(self) -> None:
        """End every process group started here, SuperNodes first; SIGKILL what outlives SIGTERM."""
        for process in reversed(self.processes):
            _signal_group(process.popen, signal.SIGTERM)
        deadline = time.monotonic() + 20.0
        for process in reversed(self.processes):
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process.popen, signal.SIGKILL)  # children (SuperExec, ClientApps) too
            try:
                process.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def alive(self) -> list[str]:
        """Names of started processes whose group still has a member."""
        return [p.name for p in self.processes if _group_exists(p.popen.pid)]

    # -- the app --------------------------------------------------------------------------------

    def app_dir(self) -> Path:
        """A copy of the Flower app (pyproject + sources) in a directory with a valid app name."""
        app = self.dir / "flowersplit"
        if not app.exists():
            shutil.copytree(ROOT, app, ignore=_only_app_files)
        return app

    def run(self, overrides: dict, timeout: float) -> subprocess.CompletedProcess:
        """``flwr run`` of the app with run-config ``overrides`` (a TOML file), logs streamed to the end."""
        lines = [f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}"
                 for key, value in overrides.items()]
        config = self.dir / f"run-config-{len(list(self.dir.glob('run-config-*')))}.toml"
        config.write_text("\n".join(lines) + "\n")
        return self.flwr("run", str(self.app_dir()), CONNECTION, "--run-config", str(config), "--stream",
                         timeout=timeout)


def _only_app_files(directory: str, names: list[str]) -> list[str]:
    rel = Path(directory).relative_to(ROOT)
    keep = set()
    for name in names:
        path = Path(directory) / name
        top = (rel / name).parts[0]
        if path.is_dir():
            if top in ("flower_split", "strategies") and name != "__pycache__":
                keep.add(name)
        elif rel == Path(".") and name in ("pyproject.toml", "README.md"):
            keep.add(name)
        elif top in ("flower_split", "strategies") and name.endswith(".py"):
            keep.add(name)
    return [name for name in names if name not in keep]


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)  # the process started its own session: its group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    """Whether a live (not zombie) process is in process group ``pgid`` (Linux: /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False
