"""ε for a history of DP-SGD steps, through Opacus's accountants.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` — exactly the form
Opacus accountants keep — so composing every round, restart and phase of a site is one
call. PRV (Gopi et al., 2021, https://arxiv.org/abs/2106.02848) is reported: Opacus
returns the upper end of its error interval, so it never under-reports. RDP (Mironov,
2017) is shown beside it. Opacus's ``gdp`` is a CLT approximation that can under-report
and is deliberately not offered.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

from fedcpt.exceptions import ConfigError
from fedcpt.privacy import plan_store
from fedcpt.privacy.opacus_lib import create_accountant

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
Step = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
MAX_SIGMA = 1e3  # noise a thousand times the clipping norm: nothing is learned
SIGMA_RESOLUTION = 1e-4
"""The planner stops once the smallest σ that meets the budget is bracketed this tightly."""
MIN_DELTA = 1e-12
"""The smallest δ a site accepts: below about 1e-13 Opacus's PRV accountant refuses to
compute ε for common histories (its floating-point error exceeds δ), and even 1e-12 fails
for some long ones (:class:`UncomputableEpsilon`)."""


class UncomputableEpsilon(ConfigError):
    """The accountant cannot compute ε for this history at this δ."""


def epsilon(history: Sequence[Step], delta: float, accountant: str = "prv") -> float:
    """Cumulative ε at ``delta`` after every entry of ``history`` (0 for no steps)."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    entries = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not entries:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    try:
        eps = float(acc.get_epsilon(delta=delta))
    except (ValueError, ArithmeticError) as err:  # PRV's floating-point and domain checks
        raise UncomputableEpsilon(
            f"the {accountant} accountant cannot compute ε at δ={delta:.3g} for this "
            f"history: {err}") from None
    if eps != eps:  # NaN: no bound at all, never a number to compare with a budget
        raise UncomputableEpsilon(f"the {accountant} accountant gave no ε at δ={delta:.3g}")
    # PRV's numerical inversion can return ε < 0 at large δ (−0.68 at δ = 0.5); ε is never
    # below 0, and reporting a negative one would be meaningless.
    return max(0.0, eps)


def plan_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
               accountant: str = "prv", prior: Sequence[Step] = (),
               tolerance: float = 0.01) -> float:
    """Smallest σ (within ``tolerance`` in ε) such that ``prior`` plus ``steps`` more steps at
    ``sample_rate`` stays at or below ``target_epsilon``.

    Opacus's ``get_noise_multiplier`` plans a single homogeneous run; a site that has
    already spent budget in earlier phases needs the plan on top of its ``prior`` history,
    so the same bisection is done here over the composed history. Cached per process on
    its (public) inputs, and across processes by :mod:`fedcpt.privacy.plan_store`: a σ
    stored by another process is used only once :func:`_meets_plan` confirms it here.
    """
    return _plan_noise(target_epsilon, delta, sample_rate, steps, accountant,
                       tuple(tuple(step) for step in prior), tolerance)


@functools.lru_cache(maxsize=256)
def _plan_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                accountant: str, prior: tuple[Step, ...], tolerance: float) -> float:
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate:.4g}: the batch "
                          "is larger than the site's data")
    spent = epsilon(list(prior), delta, accountant)
    if spent >= target_epsilon:
        raise ConfigError(f"the budget ε={target_epsilon} is already spent (ε={spent:.3f})")

    def eps(sigma: float) -> float:
        return epsilon(list(prior) + [(sigma, sample_rate, steps)], delta, accountant)

    inputs = [target_epsilon, delta, sample_rate, steps, accountant,
              [list(step) for step in prior], tolerance]
    stored = plan_store.load(inputs)
    if stored is not None:
        if _meets_plan(stored, eps, target_epsilon, tolerance):
            return stored
        log.warning("the stored noise plan σ=%g does not meet the plan for ε=%g; planning "
                    "again", stored, target_epsilon)
    sigma = _bisect_noise(eps, target_epsilon, delta, sample_rate, steps, tolerance)
    plan_store.save(inputs, sigma)
    return sigma


def _meets_plan(sigma: float, eps: Callable[[float], float], target_epsilon: float,
                tolerance: float) -> bool:
    """Whether ``sigma`` is what :func:`_bisect_noise` may return: within the budget, and
    within ``tolerance`` of it in ε or within :data:`SIGMA_RESOLUTION` of the smallest σ
    that meets it (one or two accountant calls instead of a bisection's 20-30)."""
    spent = eps(sigma)
    if spent > target_epsilon:
        return False
    if target_epsilon - spent <= tolerance:
        return True
    return sigma > SIGMA_RESOLUTION and eps(sigma - SIGMA_RESOLUTION) > target_epsilon


def _bisect_noise(eps: Callable[[float], float], target_epsilon: float, delta: float,
                  sample_rate: float, steps: int, tolerance: float) -> float:
    if eps(MAX_SIGMA) > target_epsilon:
        raise ConfigError(
            f"privacy budget ε={target_epsilon}, δ={delta:g} is too small for {steps} steps at "
            f"sample rate {sample_rate:.4g}, even with noise σ={MAX_SIGMA:g}")
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
    while high - low > SIGMA_RESOLUTION and target_epsilon - eps(high) > tolerance:
        mid = (low + high) / 2
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high
