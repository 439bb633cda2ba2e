"""A real federation on 127.0.0.1: ``flower-superlink`` and ``flower-supernode`` processes.

:class:`LocalFederation` starts the SuperLink with TLS (certificates from ``fedcpt certs``)
and SuperNode authentication, registers site keys with ``flwr supernode register``, starts
SuperNodes with a site's ``--node-config``, and submits runs with ``flwr run``. Every
process runs in its own session; :meth:`LocalFederation.stop_all` kills each one and
everything it started (Flower detaches its SuperExec into a new session).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedcpt.deploy.certs import FederationFiles, write_federation_certs

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port no one listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, logs: list[Path] = ()) -> None:
    """Poll ``predicate`` every 0.5 s; on timeout fail with the tails of ``logs``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{tail(p)}" for p in logs)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalFederation:
    """One SuperLink and any number of SuperNodes, as processes under ``root``."""

    def __init__(self, root: Path, sites: list[str]) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs: FederationFiles = write_federation_certs(root / "certs", ["127.0.0.1"],
                                                             sites)
        self.flwr_home = root / "flwr-home"
        self.flwr_home.mkdir()
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.certs.ca_cert}"\n', encoding="utf-8")
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=str(flwr_home), PYTHONUNBUFFERED="1",
                   FLWR_TELEMETRY_ENABLED="0")  # as docs/deploy.md asks of every site
        # Flower launches flower-superexec and flwr-clientapp by name.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, argv: list[str], flwr_home: Path) -> subprocess.Popen:
        fh = open(self.log(name), "wb")  # closed in stop_all
        self._logs.append(fh)
        proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], cwd=self.root,
                                env=self.env(flwr_home), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.processes[name] = proc
        return proc

    def start_superlink(self) -> None:
        self.start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-certfile", str(self.certs.server_cert),
            "--ssl-keyfile", str(self.certs.server_key),
            "--ssl-ca-certfile", str(self.certs.ca_cert),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(self.root / "superlink.db"),
        ], self.flwr_home)
        wait_for(lambda: "Uvicorn running" in self.log("superlink").read_text(errors="replace")
                 or self.processes["superlink"].poll() is not None, 60, "the SuperLink",
                 [self.log("superlink")])
        assert self.processes["superlink"].poll() is None, tail(self.log("superlink"))

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against this federation (from the repository root)."""
        return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=self.env(self.flwr_home),
                              capture_output=True, text=True, timeout=timeout)

    def register(self, site: str) -> None:
        result = self.flwr("supernode", "register", str(self.certs.site_keys[site][1]),
                           "test", "--name", site)
        assert result.returncode == 0 and "registered successfully" in result.stdout, (
            result.stdout + result.stderr)

    def start_supernode(self, name: str, key_site: str, node_config: str, *,
                        key: Path | None = None, root_certificates: Path | None = None,
                        superlink: str | None = None,
                        extra: tuple[str, ...] = ()) -> subprocess.Popen:
        """A SuperNode with ``key_site``'s key, this federation's CA and SuperLink (each
        replaceable, to test what a site gets wrong)."""
        home = self.root / f"home-{name}"
        home.mkdir()
        return self.start(f"supernode-{name}", [
            "flower-supernode", "--superlink", superlink or self.address,
            "--root-certificates", str(root_certificates or self.certs.ca_cert),
            "--auth-supernode-private-key", str(key or self.certs.site_keys[key_site][0]),
            "--port", str(free_port()), "--node-config", node_config, *extra,
        ], home)

    def wait_connected(self, name: str) -> None:
        log = self.log(f"supernode-{name}")
        wait_for(lambda: "SuperNode ID:" in log.read_text(errors="replace"), 60,
                 f"SuperNode {name} to connect", [log, self.log("superlink")])

    def run(self, run_config: str) -> str:
        """``flwr run`` the repository's app; returns the run id."""
        result = self.flwr("run", ".", "test", "--run-config", run_config, "--format", "json",
                           timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        payload = json.loads(result.stdout[result.stdout.index("{"):])
        assert payload["success"], payload
        return str(payload["run-id"])

    def run_status(self, run_id: str) -> str:
        """The SuperLink's status of a run, e.g. ``running`` or ``finished:failed``."""
        result = self.flwr("list", "test", "--run-id", run_id, "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        (run,) = json.loads(result.stdout[result.stdout.index("{"):])["runs"]
        return str(run["status"])

    def server_log(self, run_id: str) -> str:
        """The ServerApp's log of a run (``flwr log --show``)."""
        result = self.flwr("log", run_id, "test", "--show")
        return result.stdout + result.stderr

    def logs(self) -> list[Path]:
        return [self.log(name) for name in self.processes]

    def stop_all(self) -> None:
        """SIGTERM every process and everything it started, SIGKILL what is left."""
        procs: list[psutil.Process] = []
        for proc in self.processes.values():
            try:
                parent = psutil.Process(proc.pid)
                procs += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for proc in self.processes.values():
            proc.wait(timeout=5)  # reap our own children
        for fh in self._logs:
            fh.close()
