"""The run summary's ε: read from each simulated site's own ledger file, never from a
reply; a site whose ledger the server cannot read (a deployed site) holds its ε, and then
the summary states no federation maximum rather than one that could under-report it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcpt.config import RunConfig, load_config
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.server.checkpoint import RunState, TrainOutcome
from fedcpt.server.reports.report import privacy_lines
from fedcpt.server.reports.site_ledgers import FROM_LEDGERS, HELD_BY_SITES
from fedcpt.server.reports.summary import privacy_summary
from fedcpt.strategies.base import SiteTrainReport

RUN = "run-l"
STEP = (1.1, 0.25, 4)  # σ, q, steps of one round


def _cfg(folder: Path) -> RunConfig:
    return load_config("smoke-dp", overrides=[f"privacy.ledger_dir={folder}"])


def _paid(folder: Path, site: str, rounds: int, run: str = RUN) -> PrivacyLedger:
    ledger = PrivacyLedger(folder / f"{site}.ledger.json", site, delta=1e-5,
                           target_epsilon=8.0, unit="passage")
    for r in range(1, rounds + 1):
        ledger.record(run, r, *STEP)
    return ledger


def _state(*trained: str) -> RunState:
    reports = [SiteTrainReport(site=s, num_examples=16, train_loss=None, seconds=0.0,
                               bytes_up=1, update_norm=None) for s in trained]
    return RunState(run_id=RUN, train={1: TrainOutcome(reports, [], True)})


def test_a_simulated_sites_epsilon_is_read_from_its_own_ledger(tmp_path):
    cfg = _cfg(tmp_path)
    for site in cfg.sites:
        _paid(tmp_path, site.name, rounds=2)
    privacy = privacy_summary(cfg, _state(*(s.name for s in cfg.sites)))
    assert privacy["epsilon_source"] == FROM_LEDGERS and privacy["held_by_sites"] == {}
    expected = [epsilon([STEP] * k, 1e-5, cfg.privacy.accountant) for k in (1, 2)]
    for site in cfg.sites:
        entry = privacy["sites"][site.name]
        assert entry["ledger"] == str(tmp_path / f"{site.name}.ledger.json")
        assert entry["epsilon"] == pytest.approx(expected[-1])
        assert entry["epsilon_by_round"] == [(1, pytest.approx(expected[0])),
                                             (2, pytest.approx(expected[1]))]
        assert entry["noise_multiplier"] == STEP[0] and entry["sample_rate"] == STEP[1]
    assert privacy["max_epsilon"] == pytest.approx(expected[-1])
    text = "\n".join(privacy_lines(privacy))
    assert FROM_LEDGERS in text and f"**{expected[-1]:.3f}**" in text


def test_a_site_the_server_cannot_read_holds_its_epsilon_and_there_is_no_maximum(tmp_path):
    """A deployed site (not among the config's simulated sites) trained; the others' ledgers
    are read. A maximum over the read ones could be below the deployed site's ε."""
    cfg = _cfg(tmp_path)
    for site in cfg.sites:
        _paid(tmp_path, site.name, rounds=1)
    privacy = privacy_summary(cfg, _state(cfg.sites[0].name, "hospital"))
    assert privacy["held_by_sites"] == {"hospital": "held by the site"}
    assert privacy["max_epsilon"] is None and privacy["max_delta"] is None
    assert set(privacy["sites"]) == {s.name for s in cfg.sites}
    text = "\n".join(privacy_lines(privacy))
    assert "Federation unit-level" not in text and "hospital: held by the site" in text


def test_a_deployment_summary_says_the_sites_hold_epsilon(tmp_path):
    cfg = _cfg(tmp_path / "empty")  # the server's disk holds no site's ledger
    privacy = privacy_summary(cfg, _state("hospital", "clinic"))
    assert privacy["epsilon_source"] == HELD_BY_SITES and privacy["sites"] == {}
    assert set(privacy["held_by_sites"]) == {"hospital", "clinic"}
    assert privacy["max_epsilon"] is None
    assert HELD_BY_SITES in "\n".join(privacy_lines(privacy))


def test_a_ledger_of_another_run_or_a_corrupt_one_is_not_read_as_this_runs(tmp_path):
    cfg = _cfg(tmp_path)
    first, second, third = (s.name for s in cfg.sites)
    _paid(tmp_path, first, rounds=1, run="an-earlier-run")  # it never paid this run
    _paid(tmp_path, second, rounds=1)
    (tmp_path / f"{second}.ledger.json").write_text("{}")
    _paid(tmp_path, third, rounds=1)
    privacy = privacy_summary(cfg, _state(first, second, third))
    assert set(privacy["sites"]) == {third}
    assert privacy["held_by_sites"][first] == "held by the site"
    assert "cannot be read" in privacy["held_by_sites"][second]
    assert privacy["max_epsilon"] is None
