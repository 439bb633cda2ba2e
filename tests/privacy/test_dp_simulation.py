"""Unit-level DP end to end in a real Flower simulation: ledgers, the summary's privacy
block, refusals."""

from __future__ import annotations

import pytest

from fedcpt.config import load_config
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.server.reports.site_ledgers import FROM_LEDGERS
from fedcpt.simulations.runner import simulate

SITES = ("north", "south", "east")


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
@pytest.mark.smoke_run("dp")
def test_dp_run_reports_cumulative_epsilon_from_the_ledgers(smoke_dp_run):
    cfg, run_dir, summary = smoke_dp_run

    privacy = summary["privacy"]
    assert privacy["epsilon_source"] == FROM_LEDGERS and privacy["held_by_sites"] == {}
    assert set(privacy["sites"]) == set(SITES)
    assert privacy["accountant"] == "prv"
    for site, entry in privacy["sites"].items():
        ledger = PrivacyLedger.load(run_dir / "ledgers" / f"{site}.ledger.json")
        assert entry["ledger"] == str(ledger.path.resolve())  # the site's own file
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
    """Each site pays a round only while its ledger stays within its budget, and refuses
    (spending nothing) the round that would exceed it. Its N (smoke's `train_share` of its
    salted training passages: 11-20 here) differs by site and run, so each site's ledger is
    checked against its own q: paid rounds within the budget, a refused one beyond it."""
    sigma, q_steps, budget = 0.8, 4, 9.0  # smoke: 4 local steps per round, batch 4
    cfg = load_config("smoke-dp", config_file=sites_config, overrides=[
        f"privacy.noise_multiplier={sigma}", f"privacy.target_epsilon={budget}",
        f"site_policy.epsilon_budget={budget}"])
    run_dir = tmp_path / "run"
    try:
        simulate(cfg, run_dir)
    except FedcptError as err:  # every site refused round 2: the run stops, resumable
        assert "round 2 was not aggregated" in str(err)
        assert not (run_dir / "summary.json").exists()
    for site in SITES:
        ledger = PrivacyLedger.load(run_dir / "ledgers" / f"{site}.ledger.json")
        assert 1 <= len(ledger.entries) <= cfg.federation.rounds
        assert ledger.epsilon() <= budget
        q = ledger.entries[0].sample_rate
        paid = len(ledger.entries)
        if paid < cfg.federation.rounds:  # it refused the next round: that one would exceed
            assert epsilon([(sigma, q, (paid + 1) * q_steps)], ledger.delta) > budget


def test_a_stream_site_spreads_its_budget_over_its_own_phases_rounds(tmp_path):
    """In a stream each site trains in its phase's rounds only: its σ is planned for those
    steps, not for every round of the run (which would spend a third of ε here and add
    noise for nothing)."""
    from fedcpt.simulations.runner import preflight

    cfg = load_config("smoke-stream", overrides=[
        "privacy.enabled=true", "privacy.target_epsilon=8", f"privacy.ledger_dir={tmp_path}"])
    rounds = {s.name: cfg.training_rounds(s.name) for s in cfg.sites}
    assert rounds == {"comedies": 1, "licenses": 1, "c10": 1}
    assert cfg.training_rounds("a-deployed-name") == cfg.federation.rounds == 3
    assert load_config("smoke").training_rounds("north") == 2  # no phases: every round
    for plan in preflight(cfg):
        assert plan.steps == rounds[plan.site] * cfg.train.local_steps
        assert 0.9 * 8 < plan.expected_epsilon <= 8
