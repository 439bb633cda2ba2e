"""``public-units``: a site's σ, δ and budget refusals from public values only (issue 25);
planning on top of a ledger, ledgers written before it, and the site's own checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedcpt.config import SiteConfig, load_config
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import PrivacyBudgetExhausted, PrivacyLedger
from fedcpt.privacy.plan import plan_run, plan_site
from fedcpt.privacy.policy import PolicyRefused, check_inputs, site_policy
from fedcpt.privacy.report import site_row

# ε budget 8, σ planned; RDP keeps the bisections fast (the rules do not depend on it)
PRIVACY = dataclasses.replace(load_config("smoke-dp").privacy, accountant="rdp")
BATCH, STEPS, DELTA = 4, 8, 1e-5


def _eps(history) -> float:
    return epsilon(history, DELTA, "rdp")


def _policy(**node: str):
    config = {"site-name": "clinic", "data-path": "/d", **node}
    return site_policy(None, SiteConfig(name="clinic", data=("/d",)), config, deployed=True)


def _ledger(tmp_path: Path, name: str, entries: list[tuple], public_units: int = 0):
    ledger = PrivacyLedger(tmp_path / f"{name}.ledger.json", "clinic", delta=DELTA,
                           target_epsilon=8.0, accountant="rdp", public_units=public_units)
    for i, (sigma, q, steps, public) in enumerate(entries):
        ledger.record("earlier", i + 1, sigma, q, steps, public_sample_rate=public)
    return ledger


# --- planning -------------------------------------------------------------------------

def test_sigma_is_planned_at_the_public_rate_whatever_n() -> None:
    plans = [plan_site(PRIVACY, site="clinic", records=n, batch_size=BATCH, steps=STEPS,
                       delta=DELTA, public_units=20) for n in (20, 25, 4000)]
    assert len({p.noise_multiplier for p in plans}) == 1
    assert {p.public_sample_rate for p in plans} == {BATCH / 20}
    assert [p.sample_rate for p in plans] == [BATCH / n for n in (20, 25, 4000)]
    # the plan meets the budget at the public rate, so the real ε is below it
    plan = plans[1]
    real = _eps([(plan.noise_multiplier, plan.sample_rate, STEPS)])
    assert real < plan.expected_epsilon <= PRIVACY.target_epsilon
    # control: without public-units σ follows N
    without = {plan_site(PRIVACY, site="clinic", records=n, batch_size=BATCH, steps=STEPS,
                         delta=DELTA).noise_multiplier for n in (25, 40)}
    assert len(without) == 2


def test_fewer_units_than_public_units_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="fewer than its public-units 20"):
        plan_site(PRIVACY, site="clinic", records=19, batch_size=BATCH, steps=STEPS,
                  public_units=20)


def test_prior_entries_count_at_their_public_rate_never_their_real_q(tmp_path: Path) -> None:
    """Two ledgers whose earlier rounds had different real q (different N) but the same
    public rate plan the same σ; an entry recorded without a public rate counts at q = 1."""
    a = _ledger(tmp_path, "a", [(1.0, BATCH / 40, 8, BATCH / 20)], public_units=20)
    b = _ledger(tmp_path, "b", [(1.0, BATCH / 25, 8, BATCH / 20)], public_units=20)
    plans = [plan_run(PRIVACY, ledger, records=n, batch_size=BATCH, steps=STEPS, run_id="r")
             for ledger, n in ((a, 40), (b, 25))]
    assert plans[0].noise_multiplier == plans[1].noise_multiplier
    assert plans[0].expected_epsilon == pytest.approx(_eps(
        [(1.0, BATCH / 20, 8), (plans[0].noise_multiplier, BATCH / 20, STEPS)]))
    # an entry recorded before public-units counts at q = 1, not at its real q
    old = _ledger(tmp_path, "old", [(3.0, BATCH / 40, 2, None)], public_units=20)
    plan = plan_run(PRIVACY, old, records=40, batch_size=BATCH, steps=STEPS, run_id="r")
    assert plan.expected_epsilon == pytest.approx(_eps(
        [(3.0, 1.0, 2), (plan.noise_multiplier, BATCH / 20, STEPS)]))


# --- the budget refusal ---------------------------------------------------------------

def test_the_refusal_is_decided_on_the_public_bound(tmp_path: Path) -> None:
    """A round the real ε would allow is refused when its public bound passes the budget,
    and the ledger is left as it was."""
    ledger = _ledger(tmp_path, "r", [(1.0, BATCH / 40, 4, BATCH / 20)], public_units=20)
    ledger.target_epsilon = 4.0
    assert _eps(ledger.history + [(1.0, BATCH / 40, 4)]) < 4.0
    before = ledger.path.read_bytes()
    with pytest.raises(PrivacyBudgetExhausted, match="public bound on ε"):
        ledger.check_budget(1.0, BATCH / 40, 4, public_sample_rate=BATCH / 20)
    assert ledger.path.read_bytes() == before
    ledger.public_units = 0  # control: decided on the real q, the round is allowed
    assert ledger.check_budget(1.0, BATCH / 40, 4) < 4.0


def test_a_public_units_ledger_needs_a_public_rate_at_least_the_real_q(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, "p", [], public_units=20)
    for public in (None, BATCH / 40):
        with pytest.raises(ValueError, match="public rate"):
            ledger.check_budget(1.0, BATCH / 25, 8, public_sample_rate=public)


def test_real_epsilon_is_recorded_and_never_above_the_bound(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, "e", [(1.0, BATCH / 40, 8, BATCH / 20),
                                     (4.0, 1.0, 3, 1.0)], public_units=20)
    loaded = PrivacyLedger.load(ledger.path)
    assert loaded.history == [(1.0, BATCH / 40, 8), (4.0, 1.0, 3)]
    assert loaded.epsilon() == pytest.approx(_eps(loaded.history))
    assert loaded.epsilon() < _eps(loaded.public_history)


# --- ledgers written before public-units -----------------------------------------------

def test_an_old_ledger_loads_and_keeps_its_bytes(tmp_path: Path) -> None:
    """Entries recorded without a public rate are stored exactly as before; under
    public-units they count at q = 1 (training) or their public evaluation rate."""
    ledger = _ledger(tmp_path, "old", [(1.0, BATCH / 40, 8, None)])
    ledger.record("earlier/eval", 1, 4.0, 1.0, 3, kind="eval")
    stored = json.loads(ledger.path.read_text())
    assert all("public_sample_rate" not in e for e in stored["entries"])
    reopened = PrivacyLedger.open(ledger.path, "clinic", delta=DELTA, target_epsilon=8.0,
                                  accountant="rdp", public_units=20)
    assert reopened.public_history == [(1.0, 1.0, 8), (4.0, 1.0, 3)]
    assert reopened.epsilon() == pytest.approx(ledger.epsilon())  # ε at the real q


# --- δ and the site's own checks -------------------------------------------------------

def test_default_delta_from_public_units_is_never_looser_than_from_n() -> None:
    policy = _policy(**{"public-units": "20"})
    assert policy.delta_for(40) == 1e-5 == policy.delta_for(10_000)
    big = _policy(**{"public-units": "50000"})
    assert big.delta_for(50_000) == pytest.approx(2e-6)
    with pytest.raises(ConfigError, match="set `delta` explicitly"):
        big.delta_for(60_000)  # 1/(10·50000) would be looser than 1/(10·60000)
    with pytest.raises(ConfigError, match="fewer than its public-units 20"):
        policy.delta_for(19)
    explicit = _policy(**{"public-units": "50000", "delta": "1e-7"})
    assert explicit.delta_for(60_000) == 1e-7


@pytest.mark.parametrize("value", ["-1", "twenty", 20.5])
def test_a_bad_public_units_value_is_one_clear_error(value) -> None:
    with pytest.raises(ConfigError, match="public_units"):
        _policy(**{"public-units": value})


def test_the_server_cannot_shrink_n_below_public_units() -> None:
    cfg = load_config("smoke", overrides=["data.train_share=0.5"])
    inputs = dataclasses.replace(cfg.data, text_field="text", block_size=64)
    assert check_inputs(_policy(), inputs, cfg.model).train_share == 0.5
    with pytest.raises(PolicyRefused, match="public-units 20"):
        check_inputs(_policy(**{"public-units": "20"}), inputs, cfg.model)


def test_site_check_and_report_say_what_the_noise_plan_depends_on(tmp_path: Path) -> None:
    unset = _policy().lines()
    assert any(line.startswith("policy public_units: 0 (none): no `public-units` set")
               and "functions of its number of training units N" in line for line in unset)
    assert "policy public_units: 20 (σ and budget refusals planned at batch / public_units:" \
           " public values only) [site node config]" in _policy(**{"public-units": "20"}).lines()
    ledger = _ledger(tmp_path, "rep", [(1.0, BATCH / 40, 8, BATCH / 20)], public_units=20)
    ledger.policy = _policy(**{"public-units": "20"}).record()
    ledger.save()
    row = site_row(PrivacyLedger.load(ledger.path))
    assert row["public_units"] == 20 and row["epsilon"] < row["epsilon_decisions"]
    assert "public rates batch / public-units (20)" in row["decisions"]
    plain = site_row(PrivacyLedger.load(_ledger(tmp_path, "plain", [
        (1.0, BATCH / 40, 8, None)]).path))
    assert plain["decisions"].startswith("No `public-units` set: the noise multiplier σ")
