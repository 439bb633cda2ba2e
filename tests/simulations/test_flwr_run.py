"""Flower's supported path, offline: ``flwr run`` of the smoke scenario against a simulation
SuperLink installs nothing, prints no deprecation banner, and writes the same summary as
``fedcpt simulate`` (which takes the same path)."""

from __future__ import annotations

import json

import pytest

from fedcpt.config import load_config
from fedcpt.simulations.runner import simulate
from fedcpt.simulations.superlink import LocalSuperLink

pytestmark = pytest.mark.slow  # two real simulations (about a minute each on 2 idle cores)


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
