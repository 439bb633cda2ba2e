"""Before training: each site's noise multiplier from its budget and planned work."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

from fedcpt.config import PrivacyConfig
from fedcpt.privacy.accounting import Step, epsilon, plan_noise
from fedcpt.privacy.dpsgd import unit_sample_rate
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.policy import default_delta

log = logging.getLogger(__name__)


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


def sample_rate(units: int, batch_size: int) -> float:
    """The Poisson rate the unit sampler uses: q = B / N units (at most 1)."""
    return unit_sample_rate(units, batch_size)


def plan_site(privacy: PrivacyConfig, *, site: str, records: int, batch_size: int, steps: int,
              delta: float | None = None, prior: list[Step] | None = None,
              target_epsilon: float | None = None) -> SitePlan:
    """σ so that ``prior`` spend plus ``steps`` steps at the loader's rate meets the budget.

    A configured ``privacy.noise_multiplier`` is used as is (ε is then whatever it costs).
    """
    q = sample_rate(records, batch_size)
    delta = delta if delta is not None else default_delta(records)
    prior = prior or []
    sigma = privacy.noise_multiplier or plan_noise(
        target_epsilon=target_epsilon or privacy.target_epsilon, delta=delta, sample_rate=q,
        steps=steps, accountant=privacy.accountant, prior=prior)
    expected = epsilon(prior + [(sigma, q, steps)], delta, privacy.accountant)
    return SitePlan(site=site, records=records, sample_rate=q, delta=delta, steps=steps,
                    noise_multiplier=sigma, expected_epsilon=expected)


EVAL_RUN_SUFFIX = "/eval"  # ledger run id of a run's noised evaluation releases


def plan_run(privacy: PrivacyConfig, ledger: PrivacyLedger, *, records: int, batch_size: int,
             steps: int, run_id: str, reserved: tuple[Step, ...] = ()) -> SitePlan:
    """The site's plan for run ``run_id`` on top of what its ledger holds from other runs
    and phases (this run's own earlier rounds are part of the plan, not prior spend), with
    room kept for ``reserved`` releases of this run (its noised evaluations).

    Cached per process: planning runs a PRV bisection, and every round asks again."""
    own = (run_id, run_id + EVAL_RUN_SUFFIX)
    prior = tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries
                  if e.run not in own) + tuple(reserved)
    # where the ledgers live does not shape the plan: runs of one process with their own
    # ledger folders and the same spend (the arms of a compare) share it
    return _plan_cached(dataclasses.replace(privacy, ledger_dir=""), ledger.site, records,
                        batch_size, steps, prior, ledger.delta, ledger.target_epsilon)


@functools.lru_cache(maxsize=256)
def _plan_cached(privacy: PrivacyConfig, site: str, records: int, batch_size: int, steps: int,
                 prior: tuple[Step, ...], delta: float, target: float) -> SitePlan:
    plan = plan_site(privacy, site=site, records=records, batch_size=batch_size, steps=steps,
                     delta=delta, prior=list(prior), target_epsilon=target)
    log.info("site %s DP plan: σ=%.4f, q=%.5f, %d steps, expected ε=%.3f (δ=%.3g)", site,
             plan.noise_multiplier, plan.sample_rate, plan.steps, plan.expected_epsilon,
             plan.delta)
    return plan
