"""Before training: each site's noise multiplier from its budget and planned work."""

from __future__ import annotations

from dataclasses import dataclass

from fedcpt.config import PrivacyConfig
from fedcpt.privacy.accounting import Step, epsilon, plan_noise


@dataclass(frozen=True)
class SitePlan:
    """DP-SGD parameters for one site for one run."""

    site: str
    records: int
    sample_rate: float
    delta: float
    steps: int
    noise_multiplier: float
    expected_epsilon: float


def site_delta(privacy: PrivacyConfig, records: int) -> float:
    """δ for a site with ``records`` training records: the configured one, else 1/N."""
    return privacy.target_delta or 1.0 / records


def plan_site(privacy: PrivacyConfig, *, site: str, records: int, batch_size: int, steps: int,
              delta: float | None = None, prior: list[Step] | None = None) -> SitePlan:
    """σ so that ``prior`` spend plus ``steps`` steps at q = batch/N meets the budget.

    A configured ``privacy.noise_multiplier`` is used as is (ε is then whatever it costs).
    """
    q = batch_size / records
    delta = delta if delta is not None else site_delta(privacy, records)
    prior = prior or []
    sigma = privacy.noise_multiplier or plan_noise(
        target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps,
        accountant=privacy.accountant, prior=prior)
    expected = epsilon(prior + [(sigma, q, steps)], delta, privacy.accountant)
    return SitePlan(site=site, records=records, sample_rate=q, delta=delta, steps=steps,
                    noise_multiplier=sigma, expected_epsilon=expected)
