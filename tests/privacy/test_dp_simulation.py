"""Unit-level DP end to end in a real Flower simulation: ledgers, the summary's privacy
block, refusals."""

from __future__ import annotations

import json

import pytest

from fedcpt.config import load_config
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.simulations.runner import simulate

SITES = ("north", "south", "east")


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
@pytest.mark.smoke_run("dp")
def test_dp_run_reports_cumulative_epsilon_from_the_ledgers(smoke_dp_run):
    cfg, run_dir, summary = smoke_dp_run

    privacy = summary["privacy"]
    assert set(privacy["sites"]) == set(SITES)
    assert privacy["accountant"] == "prv"
    for site, entry in privacy["sites"].items():
        ledger = PrivacyLedger.load(run_dir / "ledgers" / f"{site}.ledger.json")
        assert ledger.site == site and ledger.unit == "passage"
        assert entry["unit"] == "passage"  # the summary and report name the site's unit
        assert ledger.delta == 1e-5  # the site default min(1e-5, 1/(10·N))
        assert len(ledger.entries) == cfg.federation.rounds
        assert entry["steps"] == cfg.federation.rounds * cfg.train.local_steps
        # the planned noise spends close to, and never more than, the budget
        assert 0.9 * cfg.privacy.target_epsilon < entry["epsilon"] <= cfg.privacy.target_epsilon
        assert entry["epsilon"] == pytest.approx(epsilon(ledger.history, ledger.delta))
        assert entry["epsilon_rdp"] >= entry["epsilon"]
    assert privacy["max_epsilon"] == max(e["epsilon"] for e in privacy["sites"].values())
    report = (run_dir / "report.md").read_text()
    assert "## Privacy" in report and f"| {SITES[0]} | passage |" in report


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
def test_site_refuses_the_round_that_would_exceed_its_budget(tmp_path, sites_config):
    sigma, q_steps = 0.8, 4  # smoke: 4 local steps per round, batch 4
    # Each site holds 11-13 training passages (its salted split decides which), so one
    # round costs at most ε = 8.71 (9 units) and two at least ε = 9.32 (13 units) at δ=1e-5:
    # a budget of 9 lets every site pay round 1 and refuse round 2.
    budget = 9.0
    cfg = load_config("smoke-dp", config_file=sites_config, overrides=[
        f"privacy.noise_multiplier={sigma}", f"privacy.target_epsilon={budget}",
        f"site_policy.epsilon_budget={budget}"])
    run_dir = tmp_path / "run"
    with pytest.raises(FedcptError, match="round 2 was not aggregated.*refuses to train"):
        simulate(cfg, run_dir)  # round 2: every site refuses, also when it is sent again

    error = (run_dir / "error.txt").read_text()
    assert "round 2 was not aggregated" in error and "refuses to train" in error
    assert not (run_dir / "summary.json").exists()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]  # round 1 stays, resumable
    for site in SITES:
        ledger = PrivacyLedger.load(run_dir / "ledgers" / f"{site}.ledger.json")
        assert len(ledger.entries) == 1  # the refused round spent nothing, twice
        assert ledger.epsilon() <= budget
        [entry] = ledger.entries
        assert 9 <= round(4 / entry.sample_rate) <= 13  # q = B / units, as assumed above
        assert epsilon([(sigma, entry.sample_rate, 2 * q_steps)], ledger.delta) > budget
