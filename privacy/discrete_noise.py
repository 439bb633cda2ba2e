"""Scalar releases that floating point cannot betray: a fixed integer grid and exact
discrete Gaussian noise from OpenDP.

Adding a floating-point Gaussian sample to a floating-point sum leaks the sum through the
low bits of the result (Mironov, CCS 2012): only the true sum leaves a remainder that the
noise's float format can represent. Here every value is clipped to ``[0, bound]`` and
rounded onto a grid of :data:`GRID_STEPS` steps per ``bound`` (both public), the integer
sum gets an integer sample of the discrete Gaussian N_Z(0, (σ·GRID_STEPS)²), drawn
exactly by OpenDP (``make_gaussian`` on an ``i64`` atom domain, Canonne, Kamath & Steinke
2020, "The Discrete Gaussian for Differential Privacy", https://arxiv.org/abs/2004.00010),
and only then is the noised integer scaled back: a function of the noised integer and
public parameters, so no bit of the output depends on the data except through it.

Sensitivity: each value's grid point lies in ``[0, GRID_STEPS]``, so replacing, adding or
removing one value moves the integer sum by at most ``GRID_STEPS``. OpenDP's privacy map
at that distance gives ρ-zCDP; :func:`accounted_noise_multiplier` turns ρ into the noise
multiplier ``1/√(2ρ)`` that the site's ledger records: the discrete Gaussian's Rényi
divergence at every order is at most the continuous Gaussian's of that multiplier
(Canonne, Kamath & Steinke, Theorem 4), so the ledger's RDP accountant is exact for it,
and its PRV accountant (Opacus's upper error bound) stays above dp-accounting's discrete
Gaussian PLD on this grid (``tests/privacy/test_discrete_noise.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import opendp.prelude as dp

from fedcpt.exceptions import ConfigError

GRID_STEPS = 2**16
"""Grid steps per bound: rounding moves one value by at most bound/2^17."""

dp.enable_features("contrib")  # OpenDP gates its measurement constructors behind this flag


@functools.lru_cache(maxsize=32)
def _mechanism(noise_multiplier: float) -> dp.Measurement:
    """The discrete Gaussian on integer sums, std ``σ·GRID_STEPS`` grid steps."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"a noised release needs a noise multiplier > 0, got "
                          f"{noise_multiplier!r}")
    return dp.m.make_gaussian(dp.atom_domain(T="i64"), dp.absolute_distance(T="i64"),
                              scale=noise_multiplier * GRID_STEPS)


def accounted_noise_multiplier(noise_multiplier: float) -> float:
    """The Gaussian noise multiplier the ledger records for one release at
    ``noise_multiplier``: from OpenDP's own zCDP bound ρ at sensitivity ``GRID_STEPS``,
    ``1/√(2ρ)`` (never above ``noise_multiplier``: ε is never under-reported)."""
    rho = float(_mechanism(noise_multiplier).map(GRID_STEPS))
    return min(noise_multiplier, 1.0 / math.sqrt(2.0 * rho))


def grid_point(value: float, bound: float) -> int:
    """``value`` clipped to ``[0, bound]`` (NaN counts as ``bound``, the worst case) and
    rounded onto the grid: an integer in ``[0, GRID_STEPS]``."""
    clipped = bound if math.isnan(value) else min(max(value, 0.0), bound)
    return min(GRID_STEPS, max(0, round(clipped / bound * GRID_STEPS)))


def noised_mean(values: Sequence[float], bound: float, noise_multiplier: float) -> float:
    """(Σ grid points + N_Z(0, (σ·GRID_STEPS)²)) · bound / GRID_STEPS / k for the public
    query size k = ``len(values)``."""
    if not values:
        raise ValueError("a noised mean needs at least one value")  # a bug, never input
    total = sum(grid_point(v, bound) for v in values)
    noised = int(_mechanism(noise_multiplier)(total))
    return noised * bound / GRID_STEPS / len(values)
