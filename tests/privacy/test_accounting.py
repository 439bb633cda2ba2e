"""ε is checked against Google's dp-accounting (PLD), computed independently of Opacus."""

import dataclasses

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedcpt.exceptions import ConfigError
from fedcpt.privacy.accounting import epsilon, plan_noise


def pld_epsilon(history, delta):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        event = dp_event.GaussianDpEvent(sigma) if q == 1.0 else \
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


HISTORIES = [
    [(1.0, 0.01, 1000)],
    [(0.6, 0.00427, 3000)],
    # a site's ledger across rounds and phases: σ and q change between entries
    [(0.8, 0.004, 300), (0.8, 0.004, 300), (1.1, 0.006, 200), (0.5, 0.002, 50)],
    # a unit-level smoke-dp site (11 passages, q = 4/11, 2 rounds of 4 steps) plus three
    # noised evaluation releases (Gaussian, σ = 4, no subsampling): PRV 8.256, PLD 8.246
    [(0.9462890625, 4 / 11, 8), (4.0, 1.0, 3)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_reported_epsilon_never_below_pld_and_within_two_percent(history):
    delta = 1e-5
    reported = epsilon(history, delta, "prv")
    reference = pld_epsilon(history, delta)
    assert reported >= reference
    assert reported <= 1.02 * reference


def test_rdp_is_looser_than_prv():
    history = [(1.0, 0.01, 1000)]
    assert epsilon(history, 1e-5, "rdp") > epsilon(history, 1e-5, "prv")


def test_no_steps_cost_nothing():
    assert epsilon([], 1e-5) == 0.0


def test_epsilon_is_never_negative():
    # PRV's inversion returns -0.68 here unclamped; ε < 0 is never reported
    assert epsilon([(1.0, 0.01, 10)], 0.5) == 0.0


def test_gdp_is_refused_because_it_can_under_report():
    with pytest.raises(ConfigError, match="accountant must be one of"):
        epsilon([(1.0, 0.01, 10)], 1e-5, "gdp")


def test_planned_noise_meets_the_budget_tightly():
    sigma = plan_noise(target_epsilon=8.0, delta=1e-4, sample_rate=0.01, steps=200)
    spent = epsilon([(sigma, 0.01, 200)], 1e-4)
    assert 8.0 - 0.05 <= spent <= 8.0


def test_plan_on_top_of_prior_spend_uses_more_noise():
    fresh = plan_noise(target_epsilon=4.0, delta=1e-4, sample_rate=0.01, steps=100)
    prior = [(1.0, 0.01, 100)]
    after = plan_noise(target_epsilon=4.0, delta=1e-4, sample_rate=0.01, steps=100,
                       prior=prior)
    assert after > fresh
    assert epsilon(prior + [(after, 0.01, 100)], 1e-4) <= 4.0


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ConfigError, match="too small"):
        plan_noise(target_epsilon=1e-6, delta=1e-5, sample_rate=0.5, steps=100)


def test_batch_larger_than_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="sample rate"):
        plan_noise(target_epsilon=8, delta=1e-5, sample_rate=2.0, steps=10)


def test_runs_that_keep_their_ledgers_apart_share_one_plan(tmp_path):
    # the arms of a compare: same site, data and spend, each with its own ledger folder
    from fedcpt.config import load_config
    from fedcpt.privacy.ledger import PrivacyLedger
    from fedcpt.privacy.plan import plan_run

    privacy = load_config("smoke-dp").privacy
    plans = []
    for arm in ("fedavg", "fedprox"):
        folder = tmp_path / arm
        ledger = PrivacyLedger.open(folder / "north.ledger.json", "north", delta=1e-5,
                                    target_epsilon=8.0)
        plans.append(plan_run(dataclasses.replace(privacy, ledger_dir=str(folder)), ledger,
                              records=12, batch_size=4, steps=8, run_id=arm))
    assert plans[0] is plans[1]  # planned once (a PRV bisection), not once per arm
