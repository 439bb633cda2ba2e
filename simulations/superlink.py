"""Flower's supported run path on one machine: a private simulation SuperLink plus ``flwr run``.

Flower 1.42 deprecates the in-process ``run_simulation``; ``flwr run <app> <connection>``
against a SuperLink started with ``--simulation`` is the supported way. The SuperLink here
is private to fedcpt (its own ``FLWR_HOME``, a free port on 127.0.0.1, an in-memory
database) and starts with ``--disable-runtime-dependency-installation``: otherwise every
run would ``uv sync`` the app's dependencies, torch included, into a fresh environment
from the network. Apps run in the environment fedcpt is installed in, offline.

The SuperLink runs under :mod:`fedcpt.simulations.reaper`, which stops it and everything it
started (SuperExec, ``flwr-simulation``, Ray) as soon as this process closes its pipe or
dies, however it dies: a killed ``fedcpt simulate`` leaves an interrupted run to resume.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fedcpt.exceptions import FedcptError

log = logging.getLogger(__name__)

CONNECTION = "fedcpt-local"
BIN = Path(sys.executable).parent
APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app: the repository root, whose pyproject.toml names the Server/ClientApp."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_pairs(values: dict[str, str | int | float | bool]) -> str:
    """``k=v`` pairs as ``flwr run --run-config`` parses them (strings TOML-quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


class LocalSuperLink:
    """A ``flower-superlink --simulation`` process for ``flwr run`` (a context manager)."""

    def __init__(self, home: Path, startup_timeout: float = 180.0) -> None:
        self.home = home
        self.port = _free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.log_path = home / "superlink.log"

    def env(self) -> dict[str, str]:
        """The environment of ``flwr run``, the SuperLink and all it starts. Flower's
        telemetry is off: every Flower process would otherwise post its platform and run
        events to telemetry.flower.ai, and wait up to 4 s at exit for the post."""
        env = dict(os.environ, FLWR_HOME=str(self.home), PYTHONUNBUFFERED="1",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                   FLWR_TELEMETRY_ENABLED="0")
        # Flower starts flower-superexec and flwr-simulation by name, from this environment.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def __enter__(self) -> LocalSuperLink:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n', encoding="utf-8")
        with open(self.log_path, "wb") as out:
            # stdin is the reaper's lifeline: it reads EOF once this process closes it or
            # dies. Its own session keeps a terminal's Ctrl-C from killing it before it reaps.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedcpt.simulations.reaper",
                 str(BIN / "flower-superlink"), "--simulation", "--insecure",
                 "--host", "127.0.0.1", "--port", str(self.port),
                 "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:"],
                env=self.env(), stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise FedcptError("the Flower SuperLink did not start: " + " | ".join(tail))
            time.sleep(0.5)
        log.debug("SuperLink on 127.0.0.1:%d (FLWR_HOME=%s)", self.port, self.home)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1.0):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.stdin.close()  # type: ignore[union-attr]  # the reaper's signal
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.error("the SuperLink's reaper did not exit; killing it (pid %d)",
                          self.process.pid)
                self.process.kill()
                self.process.wait()
        self.process = None

    def run(self, run_config: dict, federation_config: dict,
            on_line: Callable[[str], None], app_dir: Path = APP_DIR) -> int:
        """``flwr run`` the app and stream its logs line by line to ``on_line``; returns
        the exit status of ``flwr run`` (0 when the run finished)."""
        if not (app_dir / "pyproject.toml").is_file():
            raise FedcptError(f"no Flower app at {app_dir} (pyproject.toml missing): run from "
                              "a source checkout installed with `make install`")
        cmd = [str(BIN / "flwr"), "run", str(app_dir), CONNECTION,
               "--federation-config", toml_pairs(federation_config), "--stream"]
        if run_config:
            cmd += ["--run-config", toml_pairs(run_config)]
        with subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            for line in proc.stdout:  # type: ignore[union-attr]
                on_line(line.rstrip("\n"))
        return proc.returncode
