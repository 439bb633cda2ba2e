"""A run killed with SIGKILL resumes from its last finished round and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.versions import resumable_config

ROUNDS = 4


def fedcpt(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "fedcpt.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def finished(proc: subprocess.Popen) -> None:
    try:  # generous: the test machine's 2 cores are shared
        _, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()  # its SuperLink and simulation stop with it (simulations/reaper.py)
        raise
    assert proc.returncode == 0, err


# Three real simulations (whole, killed, resumed): 211 s under pytest with the SuperLink
# reaper (simulations/reaper.py) on a 2-core AVX2 machine.
@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, sites_config):
    common = ["simulate", "smoke", "--config", str(sites_config), "--set",
              f"federation.rounds={ROUNDS}"]
    finished(fedcpt(*common, "--out", str(tmp_path / "whole")))

    killed = tmp_path / "killed"
    proc = fedcpt(*common, "--out", str(killed), start_new_session=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: rounds 0-2 recorded, 3-4 not
    proc.wait()
    assert not (killed / "summary.json").exists()

    finished(fedcpt("simulate", "--resume", str(killed)))
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["rounds"] == whole["rounds"] == ROUNDS
    for key in ("forgetting", "adaptation"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-5)
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds == list(range(ROUNDS + 1))  # the whole run, no round lost or doubled


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already finished"):
        resumable_config(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint.json"):
        resumable_config(tmp_path / "elsewhere")
