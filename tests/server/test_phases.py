"""Continual streams ([[phases]]): config checks, LR re-warm per phase, phase-restricted
training nodes, the loss matrix / BWT / FWT, and a smoke run that resumes across phases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcpt.config import load_config
from fedcpt.exceptions import ConfigError
from fedcpt.server.continual import continual_metrics
from fedcpt.server.phases import phase_nodes
from fedcpt.strategies.base import SiteEvalReport

PHASES = """
[[phases]]
name = "early"
rounds = 1
sites = ["north", "south"]

[[phases]]
name = "late"
rounds = 2
sites = ["south", "east"]
"""


@pytest.fixture(scope="module")
def phases_config(sites_config: Path, tmp_path_factory) -> Path:
    """The local north/south/east sites in two phases: south stays, north leaves, east
    joins."""
    path = tmp_path_factory.mktemp("phases") / "phases.toml"
    path.write_text(sites_config.read_text() + PHASES, encoding="utf-8")
    return path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_smoke_phases_scenario_plan():
    cfg = load_config("smoke-phases")
    plan = cfg.phase_plan()
    assert [(p.name, p.first_round, p.last_round) for p in plan] == [
        ("early", 1, 1), ("late", 2, 3)]
    assert cfg.federation.rounds == 3
    assert plan[1].sites == ("histories", "tragedies")


def test_unknown_phase_site_is_a_config_error_naming_it(tmp_path):
    bad = PHASES.replace('"east"]', '"west"]')
    with pytest.raises(ConfigError, match=r"phases\[late\]\.sites.*unknown: west"):
        load_config("smoke", config_file=_write(tmp_path, bad.replace(
            "north", "comedies").replace("south", "histories")))


def test_rounds_default_to_the_phases_and_must_match_them(tmp_path, sites_config):
    text = sites_config.read_text() + PHASES
    cfg = load_config(None, config_file=_write(tmp_path, text))  # no federation.rounds
    assert cfg.federation.rounds == 3
    with pytest.raises(ConfigError, match="federation.rounds.*sum of the \\[\\[phases\\]\\]"):
        load_config(None, config_file=_write(tmp_path, text),
                    overrides=["federation.rounds=5"])
    with pytest.raises(ConfigError, match="eval_sites_per_round"):
        load_config(None, config_file=_write(tmp_path, text),
                    overrides=["federation.eval_sites_per_round=2"])
    with pytest.raises(ConfigError, match="sites_per_round.*smallest phase"):
        load_config(None, config_file=_write(tmp_path, text.replace(
            'sites = ["north", "south"]', 'sites = ["north"]')),
            overrides=["federation.sites_per_round=2"])
    with pytest.raises(ConfigError, match="phases.sites.*secure aggregation"):
        load_config(None, config_file=_write(tmp_path, text),
                    overrides=["secagg.mode=on", "federation.max_update_norm=1"])
    with pytest.raises(ConfigError, match="`phases` cannot be overridden"):
        load_config("smoke", overrides=["phases=x"])


def test_lr_rewarms_and_redecays_in_each_phase(tmp_path, sites_config):
    text = sites_config.read_text() + PHASES.replace("rounds = 1", "rounds = 3").replace(
        "rounds = 2", "rounds = 3")
    cfg = load_config(None, config_file=_write(tmp_path, text), overrides=[
        "train.lr=0.01", "train.schedule=cosine", "train.warmup_rounds=1",
        "train.min_lr_ratio=0.1"])
    lrs = [cfg.lr_at(r) for r in range(1, 7)]
    assert lrs == pytest.approx([0.005, 0.01, 0.001] * 2)
    # without phases: one schedule over the whole run, as before
    single = load_config("smoke", overrides=["train.schedule=cosine",
                                             "federation.rounds=4"])
    assert [single.lr_at(r) for r in range(5)] == [
        single.train.lr_at(r, 4) for r in range(5)]


def _report(site: str, loss: float, base: float, tokens: int = 100) -> SiteEvalReport:
    return SiteEvalReport(site=site, tokens=tokens, loss=loss, base_loss=base, ece=0.0)


def test_loss_matrix_bwt_and_fwt_by_hand(tmp_path, sites_config):
    cfg = load_config(None, config_file=_write(tmp_path, sites_config.read_text() + PHASES))
    base = {"north": 4.0, "south": 3.0, "east": 5.0}
    after_1 = {"north": 3.0, "south": 2.0, "east": 4.8}  # end of phase "early" (round 1)
    after_2 = {"north": 3.5, "south": 1.8, "east": 4.0}  # end of phase "late" (round 3)
    evals = {r: [_report(s, v[s], base[s], tokens=100 if s != "south" else 300)
                 for s in v] for r, v in ((1, after_1), (2, after_1), (3, after_2))}
    m = continual_metrics(cfg, evals, {0: 2.0, 1: 2.1, 2: 2.2, 3: 2.05})
    early = lambda d: (d["north"] * 100 + d["south"] * 300) / 400  # noqa: E731
    late = lambda d: (d["south"] * 300 + d["east"] * 100) / 400  # noqa: E731
    expected = [[early(after_1), late(after_1)], [early(after_2), late(after_2)]]
    for got, want in zip(m["loss_matrix"], expected, strict=True):
        assert got == pytest.approx(want)
    assert m["base_loss"] == pytest.approx([early(base), late(base)])
    assert m["bwt"] == pytest.approx(early(after_2) - early(after_1))   # 2.225 − 2.25
    assert m["fwt"] == pytest.approx(late(after_1) - late(base))        # 2.7 − 3.5
    assert m["phase_adaptation"] == pytest.approx([early(base) - early(after_1),
                                                   late(base) - late(after_2)])
    assert m["general_forgetting"] == pytest.approx([0.1, 0.05])


def test_phase_nodes_are_the_nodes_of_the_phases_sites():
    # the round loop samples a phase's training among these; see tests/server/test_round_loop
    directory = {11: "north", 12: "south", 13: "east"}
    assert sorted(phase_nodes(directory, ("south", "east"), "late")) == [12, 13]


def test_a_phase_site_without_a_node_is_an_error():
    from fedcpt.exceptions import FedcptError

    with pytest.raises(FedcptError, match="west"):
        phase_nodes({1: "north"}, ("north", "west"), "late")


def _fedcpt(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "fedcpt.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def _finished(proc: subprocess.Popen) -> None:
    try:  # generous: the test machine's 2 cores are shared
        _, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()  # its SuperLink and simulation stop with it (simulations/reaper.py)
        raise
    assert proc.returncode == 0, err


# Three real simulations (whole, killed, resumed): 198 s under pytest with the SuperLink
# reaper (simulations/reaper.py) on a 2-core AVX2 machine. This is the SIGKILL-and-resume
# test of every run: a phased run with a server optimiser has the most state to restore
# (phase, momentum, LR schedule, sampling RNG, adapter version).
@pytest.mark.slow
def test_phased_run_trains_phase_sites_and_resumes_across_phases(tmp_path, phases_config):
    # with FedAvgM, the resumed run matches only if the momentum is restored too
    common = ["simulate", "smoke-phases", "--config", str(phases_config),
              "--set", "strategy.server_optimizer=fedavgm"]
    whole = tmp_path / "whole"
    _finished(_fedcpt(*common, "--out", str(whole)))
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["sites_trained"]) for r in rows[1:]] == [
        ["north", "south"], ["east", "south"], ["east", "south"]]
    assert [r["phase"] for r in rows] == ["early", "early", "late", "late"]
    assert all(set(r["domain_per_site"]) == {"north", "south", "east"} for r in rows[1:])
    summary = json.loads((whole / "summary.json").read_text())
    c = summary["continual"]
    assert [p["name"] for p in c["phases"]] == ["early", "late"]
    assert len(c["loss_matrix"]) == 2 and all(v is not None for row in c["loss_matrix"]
                                              for v in row)
    assert c["bwt"] == pytest.approx(c["loss_matrix"][1][0] - c["loss_matrix"][0][0])
    assert c["fwt"] == pytest.approx(c["loss_matrix"][0][1] - c["base_loss"][1])
    assert "Backward transfer BWT" in (whole / "report.md").read_text()

    killed = tmp_path / "killed"
    proc = _fedcpt(*common, "--out", str(killed), start_new_session=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # phase "early" finished, "late" not
    proc.wait()
    assert not (killed / "summary.json").exists()
    assert json.loads((killed / "checkpoint.json").read_text())["phase"] in (0, 1)
    _finished(_fedcpt("simulate", "--resume", str(killed)))
    resumed = json.loads((killed / "summary.json").read_text())
    flat = [v for row in resumed["continual"]["loss_matrix"] for v in row]
    assert flat == pytest.approx([v for row in c["loss_matrix"] for v in row], abs=1e-5)
    for key in ("forgetting", "adaptation"):
        assert resumed[key] == pytest.approx(summary[key], abs=1e-5)
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]  # the whole run, no round lost or doubled
