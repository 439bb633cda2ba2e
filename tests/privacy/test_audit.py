"""One-run auditing: the bound's arithmetic, leakage without DP, and never above DP's ε."""

from dataclasses import replace

import pytest

from fedcpt.config import SiteConfig, load_config
from fedcpt.privacy.audit import audit_p_value, epsilon_lower_bound, run_audit


def test_chance_level_guessing_gives_no_bound():
    assert epsilon_lower_bound(m=200, r=100, v=50, delta=1e-5) == 0.0


def test_more_correct_guesses_give_a_larger_bound():
    bounds = [epsilon_lower_bound(m=200, r=100, v=v, delta=1e-5) for v in (70, 85, 100)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]


def test_p_value_is_the_binomial_tail_without_delta():
    # all 10 guesses right under ε = 0 (coin flips): 2^-10
    assert audit_p_value(m=10, r=10, v=10, eps=0.0, delta=0.0) == pytest.approx(2 ** -10)


def test_delta_only_weakens_the_bound():
    assert (epsilon_lower_bound(m=200, r=100, v=90, delta=1e-3)
            < epsilon_lower_bound(m=200, r=100, v=90, delta=0.0))


def _cfg(path, *overrides):
    """The smoke scenario with one local site."""
    cfg = load_config("smoke", overrides=["train.batch_size=8", *overrides])
    return replace(cfg, sites=(SiteConfig(name="clinic", data=(str(path),)),))


# Canary audits train and score a model per canary: 135-160 s each on a 2-core AVX2 CPU
# (fp32), so they run in the slow tier.
@pytest.mark.slow
def test_without_dp_the_audit_detects_leakage(write_text):
    cfg = _cfg(write_text("clinic.txt", 60_000, seed=7))
    result = run_audit(cfg, canaries=100, data_blocks=100, steps=200)
    assert not result.dp
    assert result.epsilon_lower_bound > 0.5
    assert result.tpr_at_fpr["0.05"] > 0.2


@pytest.mark.slow  # one seed (seed 1 also held while it ran): each audit is CPU minutes
def test_with_dp_the_bound_never_exceeds_the_accountant(write_text):
    cfg = _cfg(write_text("clinic.txt", 60_000, seed=7), "privacy.enabled=true",
               "privacy.target_epsilon=2")
    result = run_audit(cfg, canaries=100, data_blocks=100, steps=200, seed=0)
    assert result.dp and result.accountant_epsilon is not None
    assert result.accountant_epsilon <= 2.0
    assert result.epsilon_lower_bound <= result.accountant_epsilon
