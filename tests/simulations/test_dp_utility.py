"""DP utility: the DP scenario is plain FedAvg's (`shakespeare-fedavg`) plus DP settings,
and the benchmark's report (adaptation kept, wall-time ratio, ε spent) is computed from two
real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcpt.config import load_config
from fedcpt.simulations.dp_utility import KEPT_GOAL, UtilityArm, compare_utility

ROOT = Path(__file__).resolve().parents[2]


def _arm(adaptation: float | None, wall: float, epsilon: float | None = None) -> UtilityArm:
    privacy = None if epsilon is None else {"max_epsilon": epsilon, "max_delta": 1e-5,
                                            "accountant": "prv", "level": "unit",
                                            "sites": {}}
    return UtilityArm(scenario="s", overrides=[], settings={}, adaptation=adaptation,
                      forgetting=0.1, forgetting_standard_error=0.01, domain_loss={},
                      general_loss={}, wall_s=wall, privacy=privacy, run_dir="r")


def test_kept_and_wall_ratio_are_dp_over_reference():
    report = compare_utility(_arm(0.5, 100.0), _arm(0.35, 250.0, epsilon=7.9))
    assert report["adaptation_kept"] == pytest.approx(0.7)
    assert report["wall_time_ratio"] == pytest.approx(2.5)
    assert report["epsilon_per_unit"] == 7.9 and report["delta_per_unit"] == 1e-5
    assert report["goals_met"] == {"adaptation_kept": True, "wall_time_ratio": True}


def test_goals_fail_below_the_milestone():
    report = compare_utility(_arm(0.6, 100.0), _arm(0.6 * KEPT_GOAL - 0.01, 301.0, 8.0))
    assert report["goals_met"] == {"adaptation_kept": False, "wall_time_ratio": False}
    # a DP run that made the domain worse keeps a negative share, not a silent zero
    assert compare_utility(_arm(0.5, 1.0), _arm(-0.1, 1.0, 8.0))["adaptation_kept"] < 0
    # no reference adaptation: nothing to keep a share of
    assert compare_utility(_arm(None, 1.0), _arm(0.2, 1.0, 8.0))["adaptation_kept"] is None


def test_shakespeare_dp_is_plain_fedavg_with_dp_settings_only():
    ref, dp = load_config("shakespeare-fedavg"), load_config("shakespeare-dp")
    assert dp.privacy.enabled and dp.privacy.target_epsilon == 8.0
    assert dp.privacy.ffa_lora and dp.train.max_physical_batch_size > 0
    assert dp.train.batch_size > ref.train.batch_size  # a logical batch, split physically
    # everything the two runs are measured on is the reference's own
    for section in ("model", "lora", "data", "sites", "site_policy", "seed", "strategy"):
        assert getattr(dp, section) == getattr(ref, section), section
    assert dp.federation == ref.federation
    assert dp.train.schedule == ref.train.schedule


@pytest.mark.slow
def test_benchmark_runs_both_smoke_scenarios_end_to_end(tmp_path):
    out = tmp_path / "dp_utility.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dp_utility.py"),
                           "--out", str(out), "--reference", "smoke", "--dp", "smoke-dp"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ref, dp = report["reference"], report["dp"]
    assert report["as_shipped"] and report["overrides"] == []
    assert ref["privacy"] is None and ref["settings"]["privacy"] is None
    assert dp["settings"]["privacy"]["target_epsilon"] == 8.0
    assert 0 < report["epsilon_per_unit"] <= 8.0  # the budget spent, never above it
    assert report["adaptation_kept"] == pytest.approx(dp["adaptation"] / ref["adaptation"])
    assert report["wall_time_ratio"] == pytest.approx(dp["wall_s"] / ref["wall_s"])
    assert report["forgetting"] == {"reference": ref["forgetting"], "dp": dp["forgetting"]}
    assert report["cpu_class"]["isa"] and "machine" in report
    # the DP run's sites held out the reference's units: both measured the same blocks
    bases = [{site: v["base"] for site, v in arm["domain_loss"]["per_site"].items()}
             for arm in (ref, dp)]
    assert bases[0] == bases[1] and bases[0]
