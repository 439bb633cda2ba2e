"""The reaper stops every process a SuperLink started, detached ones included, when the
process that owns the run dies (SIGKILL too) or when the SuperLink exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the orphan case needs Linux's child subreaper")

# Stands in for flower-superlink: starts a daemon in a session of its own (as Flower starts
# its SuperExec) that writes its pid, then sleeps, or exits and leaves the daemon orphaned.
SUPERLINK = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c",
                      "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid()));"
                      " time.sleep(120)", sys.argv[1]], start_new_session=True)
    if sys.argv[2] == "exit":
        time.sleep(1.0)
        sys.exit(3)
    time.sleep(120)
""")


def _reaper(pid_file: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "fedcpt.simulations.reaper", sys.executable, "-c",
            SUPERLINK, str(pid_file), mode]


def _daemon(pid_file: Path) -> psutil.Process:
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the daemon never started"
        time.sleep(0.05)
    return psutil.Process(int(pid_file.read_text()))


def _gone(proc: psutil.Process, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_a_sigkilled_owner_takes_the_detached_daemon_with_it(tmp_path):
    # the owner (fedcpt simulate) holds the reaper's stdin and is SIGKILLed: no cleanup runs
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, time
        subprocess.Popen({_reaper(tmp_path / "pid", "sleep")!r}, stdin=subprocess.PIPE,
                         start_new_session=True)
        time.sleep(120)
    """)])
    try:
        daemon = _daemon(tmp_path / "pid")
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert _gone(daemon), f"daemon {daemon.pid} outlived the killed owner"
    finally:
        owner.kill()


def test_an_exiting_superlink_leaves_no_orphan_and_its_status_is_kept(tmp_path):
    reaper = subprocess.Popen(_reaper(tmp_path / "pid", "exit"), stdin=subprocess.PIPE)
    try:
        daemon = _daemon(tmp_path / "pid")
        assert reaper.wait(timeout=30) == 3
        assert _gone(daemon), f"orphaned daemon {daemon.pid} was left running"
    finally:
        reaper.kill()
