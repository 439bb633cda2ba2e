"""DP end to end in a real Flower simulation: ledgers, the summary's privacy block, refusals."""

from __future__ import annotations

import json

import pytest

from fedcpt.config import load_config
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.simulations.runner import simulate

SITES = ("north", "south", "east")


def test_dp_run_reports_cumulative_epsilon_from_the_ledgers(smoke_dp_run):
    cfg, run_dir, summary = smoke_dp_run

    privacy = summary["privacy"]
    assert set(privacy["sites"]) == set(SITES)
    assert privacy["accountant"] == "prv"
    for site, entry in privacy["sites"].items():
        ledger = PrivacyLedger.load(run_dir / "ledgers" / f"{site}.ledger.json")
        assert ledger.site == site
        assert len(ledger.entries) == cfg.federation.rounds
        assert entry["steps"] == cfg.federation.rounds * cfg.train.local_steps
        # the planned noise spends close to, and never more than, the budget
        assert 0.9 * cfg.privacy.target_epsilon < entry["epsilon"] <= cfg.privacy.target_epsilon
        assert entry["epsilon"] == pytest.approx(epsilon(ledger.history, ledger.delta))
        assert entry["epsilon_rdp"] >= entry["epsilon"]
    assert privacy["max_epsilon"] == max(e["epsilon"] for e in privacy["sites"].values())
    assert "## Privacy" in (run_dir / "report.md").read_text()


def test_site_refuses_the_round_that_would_exceed_its_budget(tmp_path, sites_config):
    sigma, q_steps = 0.8, 4  # smoke: 4 local steps per round
    probe = load_config("smoke-dp", config_file=sites_config)
    records = 20_000 // probe.data.block_size  # max_site_tokens caps every site equally
    q = probe.train.batch_size / records
    one_round = epsilon([(sigma, q, q_steps)], 1 / records)
    two_rounds = epsilon([(sigma, q, 2 * q_steps)], 1 / records)
    budget = (one_round + two_rounds) / 2
    cfg = load_config("smoke-dp", config_file=sites_config, overrides=[
        f"privacy.noise_multiplier={sigma}", f"privacy.target_epsilon={budget}"])
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
