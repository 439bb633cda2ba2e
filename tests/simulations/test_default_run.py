"""The goal benchmark of the product: the default run's measures as shares of plain
FedAvg's, checked against the goals, from the two runs' summaries."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fedcpt.simulations.default_run import (
    DRIFT_GOAL,
    RunMeasures,
    default_run,
    drift_share,
    goal_report,
    measures,
)


def _summary(adaptation: float, kl: float, answer: float, oop: float,
             epsilon: float | None) -> dict:
    return {"adaptation": adaptation, "forgetting": oop, "domain_loss": {"base": 4.1},
            "retention": {"out_of_pool": {"forgetting": oop, "kl_to_base": kl},
                          "behaviour": {"answer_loss_increase": answer,
                                        "exact_match_base": 1.0, "exact_match": 0.5,
                                        "kl_to_base": 2 * kl}},
            "privacy": None if epsilon is None else {"max_epsilon": epsilon,
                                                      "max_delta": 1e-5}}


def _measures(summary: dict, wall: float = 100.0) -> RunMeasures:
    return measures("s", [], summary, wall, 2 * wall, Path("r"))


def test_measures_read_the_out_of_pool_kl_not_the_overall_one():
    m = _measures(_summary(0.5, 0.4, 0.2, 0.15, None))
    assert (m.adaptation, m.kl_to_base_out_of_pool, m.answer_loss_increase,
            m.out_of_pool_forgetting) == (0.5, 0.4, 0.2, 0.15)
    assert m.epsilon is None and m.exact_match == 0.5 and m.domain_base == 4.1
    assert _measures(_summary(0.3, 0.1, 0.0, 0.0, 7.9)).epsilon == 7.9


def test_shares_of_plain_fedavg_and_the_goals():
    plain = _measures(_summary(0.5, 0.5, 0.2, 0.2, None))
    good = _measures(_summary(0.31, 0.09, 0.04, -0.01, 7.99), wall=500.0)
    report = goal_report(plain, good, native_bf16=True)
    assert report["adaptation_kept"] == pytest.approx(0.62)
    assert report["drift_share"]["kl_to_base_out_of_pool"] == pytest.approx(0.18)
    assert report["drift_share"]["answer_loss_increase"] == pytest.approx(0.2)
    assert report["drift_share"]["out_of_pool_forgetting"] == pytest.approx(-0.05)
    assert report["all_goals_met"]
    # each goal fails on its own
    failing = {"adaptation_kept": replace(good, adaptation=0.29),
               "kl_to_base_out_of_pool": replace(good, kl_to_base_out_of_pool=0.11),
               "answer_loss_increase": replace(good, answer_loss_increase=0.05),
               "out_of_pool_forgetting": replace(good, out_of_pool_forgetting=0.05),
               "epsilon": replace(good, epsilon=8.01),
               "wall_s": replace(good, wall_s=601.0)}
    for goal, run in failing.items():
        report = goal_report(plain, run, native_bf16=True)
        assert not report["goals_met"][goal] and not report["all_goals_met"], goal
    # fp32 (an AVX2 CPU's precision) has twice the time
    assert goal_report(plain, replace(good, wall_s=1100.0), native_bf16=False)["all_goals_met"]


def test_a_drift_plain_fedavg_did_not_show_is_not_a_met_goal():
    assert drift_share(0.01, 0.0) is None and drift_share(0.01, -0.1) is None
    assert drift_share(None, 0.1) is None and drift_share(0.02, 0.1) == pytest.approx(DRIFT_GOAL)
    plain = _measures(_summary(0.5, 0.5, 0.0, 0.2, None))
    report = goal_report(plain, _measures(_summary(0.4, 0.05, 0.0, 0.0, 8.0)), True)
    assert report["drift_share"]["answer_loss_increase"] is None
    assert not report["goals_met"]["answer_loss_increase"]


def test_the_reference_must_be_another_scenario(tmp_path):
    with pytest.raises(ValueError, match="different scenarios"):
        default_run(tmp_path, "smoke", "smoke")


def test_cpu_time_counts_the_processes_the_run_starts():
    """A simulation's work runs in descendant processes (SuperLink, Ray workers) that are
    not waited-for children: their CPU seconds must be counted."""
    import subprocess
    import sys

    from fedcpt.simulations.default_run import TreeCPU

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
    with TreeCPU(interval=0.1) as cpu:
        # a grandchild, as the SuperLink's simulation process is
        subprocess.run([sys.executable, "-c", f"import subprocess, sys; subprocess.run("
                        f"[sys.executable, '-c', {burn!r}])"], check=True)
    assert cpu.seconds >= 0.7  # the grandchild's second, less at most one interval


def test_runs_measured_on_different_held_out_blocks_meet_no_goal_set():
    plain = _measures(_summary(0.5, 0.5, 0.2, 0.2, None))
    good = _measures(_summary(0.31, 0.09, 0.04, -0.01, 7.99), wall=500.0)
    assert goal_report(plain, good, native_bf16=True)["goals_met"]["same_heldout"]
    other = goal_report(plain, replace(good, domain_base=4.05), native_bf16=True)
    assert not other["goals_met"]["same_heldout"] and not other["all_goals_met"]
