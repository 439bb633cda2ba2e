"""Flower's supported path, offline: ``flwr run`` of the smoke scenario against a simulation
SuperLink installs nothing, prints no deprecation banner, and writes the same summary as
``fedcpt simulate`` (which takes the same path)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from fedcpt.config import load_config
from fedcpt.exceptions import ConfigError
from fedcpt.server.app import JOB_MARK
from fedcpt.simulations.runner import Job, RunLogs, federation_config, simulate, simulate_many
from fedcpt.simulations.superlink import LocalSuperLink, toml_pairs


def test_federation_config_has_one_supernode_per_site_and_whole_cpus():
    cfg = load_config("smoke", overrides=["simulation.num_cpus=2"])
    assert federation_config(cfg) == {"num-supernodes": 3, "client-resources-num-cpus": 1,
                                      "client-resources-num-gpus": 0,
                                      "init-args-num-cpus": 2}


@pytest.mark.parametrize("scenario", ["smoke", "smoke-dp", "smoke-secagg", "smoke-default"])
def test_the_smoke_sites_share_one_ray_worker(scenario):
    # the smoke work is seconds: a second worker only repeats its start (see smoke.toml)
    fed = federation_config(load_config(scenario))
    assert fed["init-args-num-cpus"] // fed["client-resources-num-cpus"] == 1


@pytest.mark.parametrize("cpus", ["0.5", "1.5", "0"])
def test_a_fractional_cpu_per_client_is_refused_with_the_key_named(cpus):
    # Flower's SimulationConfig carries client CPUs as an integer; `flwr run` would fail
    # with only "'float' object cannot be interpreted as an integer"
    with pytest.raises(ConfigError, match=r"simulation\.cpus_per_client.*whole number"):
        load_config("smoke", overrides=[f"simulation.cpus_per_client={cpus}"])


def test_ray_address_is_refused_with_the_key_named():
    cfg = load_config("smoke", overrides=["simulation.ray_address=auto"])
    with pytest.raises(ConfigError, match=r"simulation\.ray_address"):
        federation_config(cfg)


def test_run_config_strings_are_toml_quoted():
    assert toml_pairs({"scenario": "smoke", "set": 'a=1 b="x y"', "n": 3}) == (
        'scenario="smoke" set="a=1 b=\\"x y\\"" n=3')


def test_flower_processes_of_a_simulation_post_no_telemetry(tmp_path):
    # what Flower's processes would send: an event, through urllib, to telemetry.flower.ai
    probe = ("import urllib.request\n"
             "def sent(*args, **kwargs):\n"
             "    raise SystemExit('telemetry posted')\n"
             "urllib.request.urlopen = sent\n"
             "from flwr.supercore import telemetry\n"
             "print(telemetry.create_event(telemetry.EventType.FLWR_SIMULATION_RUN_ENTER, {}))")
    env = LocalSuperLink(tmp_path).env()
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "disabled"


@pytest.mark.slow  # two real simulations (about a minute each on 2 idle cores)
def test_flwr_run_matches_fedcpt_simulate(tmp_path):
    cli_lines: list[str] = []
    summary = simulate(load_config("smoke"), tmp_path / "simulate", on_line=cli_lines.append)

    lines: list[str] = []
    with LocalSuperLink(tmp_path / "flwr-home") as superlink:
        status = superlink.run({"scenario": "smoke", "out-dir": str(tmp_path / "runs"),
                                "set": "secagg.mode=off"},
                               {"num-supernodes": 3, "client-resources-num-cpus": 1},
                               lines.append)
    streamed = "\n".join(lines)
    assert status == 0, streamed[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    flwr_summary = json.loads((run_dir / "summary.json").read_text())
    assert set(flwr_summary) == set(summary)
    assert flwr_summary["rounds"] == summary["rounds"] == 2

    for text in (streamed, "\n".join(cli_lines)):
        assert "uv sync" not in text and "Installing application dependencies" not in text
        assert "DEPRECATED" not in text
        assert "progress round" in text  # the live view's events reach the stream
    assert not any((tmp_path / "flwr-home" / "runtime-envs").glob("*"))
    assert (tmp_path / "simulate" / "run.log").read_text().count("progress round") > 0


def test_runs_on_one_engine_need_the_same_federation(tmp_path):
    three = load_config("smoke")
    two = dataclasses.replace(three, sites=three.sites[:2])
    jobs = [Job(three, tmp_path / "a"), Job(two, tmp_path / "b")]
    with pytest.raises(ConfigError, match="same federation"):
        simulate_many(jobs)
    assert not (tmp_path / "a").exists()  # refused before anything started


def test_streamed_lines_go_to_the_run_log_of_the_run_they_belong_to(tmp_path):
    run_dirs = [tmp_path / "a", tmp_path / "b"]
    for folder in run_dirs:
        folder.mkdir()
    seen: list[str] = []
    logs = RunLogs(run_dirs, seen.append)
    lines = ["engine starting",
             f"INFO fedcpt.server.app: {JOB_MARK} 1 of 2: {run_dirs[0]}", "a's round",
             f"INFO fedcpt.server.app: {JOB_MARK} 2 of 2: {run_dirs[1]}", "b's round"]
    for line in lines:
        logs.record(line)
    logs.close()
    assert seen == lines
    assert (run_dirs[0] / "run.log").read_text().splitlines() == lines[:3]
    assert (run_dirs[1] / "run.log").read_text().splitlines() == lines[3:]
