"""Before training: each site's noise multiplier from its budget and planned work.

Without ``public-units`` the plan is made at the real rate q = batch / N, so σ (and the
update's noise scale σ·C/batch) is a function of N. With it, the plan is made at the
public rate batch / public-units for this run and for every prior ledger entry
(:attr:`~fedcpt.privacy.ledger.LedgerEntry.decision_rate`), so σ depends on public values
only; the sampler still samples at the real q, which is at most the public rate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

from fedcpt.config import PrivacyConfig
from fedcpt.exceptions import ConfigError
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
    """ε after the planned steps at the planning rates: with public-units, the public bound
    budget refusals are decided on (the real ε is at most this)."""
    public_sample_rate: float
    """The rate σ was planned at: batch / public-units, or ``sample_rate`` without it."""
    public_units: int = 0
    """The site's declared public unit count σ was planned at (0: none, the real N)."""

    @property
    def ledger_public_rate(self) -> float | None:
        """The public rate the ledger's decisions use for this plan's steps: None when σ
        was planned at the real q (no ``public-units``)."""
        return self.public_sample_rate if self.public_units else None


def sample_rate(units: int, batch_size: int) -> float:
    """The Poisson rate the unit sampler uses: q = B / N units (at most 1)."""
    return unit_sample_rate(units, batch_size)


def plan_site(privacy: PrivacyConfig, *, site: str, records: int, batch_size: int, steps: int,
              delta: float | None = None, prior: list[Step] | None = None,
              target_epsilon: float | None = None, public_units: int = 0) -> SitePlan:
    """σ so that ``prior`` spend plus ``steps`` steps at the loader's rate meets the budget.

    With ``public_units`` the steps are planned at batch / public_units instead (``prior``
    must then be at public rates too), and the default δ is min(1e-5, 1/(10·public_units)).
    A configured ``privacy.noise_multiplier`` is used as is (ε is then whatever it costs).
    """
    if public_units and records < public_units:
        raise ConfigError(f"site {site!r} has {records} training units, fewer than its "
                          f"public-units {public_units}")
    q = sample_rate(records, batch_size)
    planned = sample_rate(public_units, batch_size) if public_units else q
    delta = delta if delta is not None else default_delta(public_units or records)
    prior = prior or []
    sigma = privacy.noise_multiplier or plan_noise(
        target_epsilon=target_epsilon or privacy.target_epsilon, delta=delta,
        sample_rate=planned, steps=steps, accountant=privacy.accountant, prior=prior)
    expected = epsilon(prior + [(sigma, planned, steps)], delta, privacy.accountant)
    return SitePlan(site=site, records=records, sample_rate=q, delta=delta, steps=steps,
                    noise_multiplier=sigma, expected_epsilon=expected,
                    public_sample_rate=planned, public_units=public_units)


EVAL_RUN_SUFFIX = "/eval"  # ledger run id of a run's noised evaluation releases


def plan_run(privacy: PrivacyConfig, ledger: PrivacyLedger, *, records: int, batch_size: int,
             steps: int, run_id: str, reserved: tuple[Step, ...] = ()) -> SitePlan:
    """The site's plan for run ``run_id`` on top of what its ledger holds from other runs
    and phases (this run's own earlier rounds are part of the plan, not prior spend), with
    room kept for ``reserved`` releases of this run (its noised evaluations). Under the
    ledger's ``public_units`` the prior entries count at their public decision rates.

    Cached per process: planning runs a PRV bisection, and every round asks again."""
    own = (run_id, run_id + EVAL_RUN_SUFFIX)
    public = ledger.public_units
    prior = tuple((e.noise_multiplier, e.decision_rate if public else e.sample_rate, e.steps)
                  for e in ledger.entries if e.run not in own) + tuple(reserved)
    # where the ledgers live does not shape the plan: runs of one process with their own
    # ledger folders and the same spend (the arms of a compare) share it
    return _plan_cached(dataclasses.replace(privacy, ledger_dir=""), ledger.site, records,
                        batch_size, steps, prior, ledger.delta, ledger.target_epsilon, public)


@functools.lru_cache(maxsize=256)
def _plan_cached(privacy: PrivacyConfig, site: str, records: int, batch_size: int, steps: int,
                 prior: tuple[Step, ...], delta: float, target: float,
                 public_units: int) -> SitePlan:
    plan = plan_site(privacy, site=site, records=records, batch_size=batch_size, steps=steps,
                     delta=delta, prior=list(prior), target_epsilon=target,
                     public_units=public_units)
    bound = (f" at the public rate {plan.public_sample_rate:.5f} (public-units "
             f"{public_units})" if public_units else "")
    log.info("site %s DP plan: σ=%.4f, q=%.5f, %d steps, expected ε=%.3f%s (δ=%.3g)", site,
             plan.noise_multiplier, plan.sample_rate, plan.steps, plan.expected_epsilon,
             bound, plan.delta)
    return plan
