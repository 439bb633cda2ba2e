"""The share of DP-off adaptation a site can expect from unit-level DP-SGD, at its unit count
N and ε budget, read off what ``benchmarks/dp_utility_vs_units.py`` measured.

DP's cost falls as N grows: the sampling rate q = B / N falls, and the noise σ that a
budget allows falls with it. :data:`KEPT` is the measured share (DP / DP-off adaptation at
the same compute); :func:`expected_share` interpolates it linearly in log N and in ε, and
says nothing outside the measured range. One benchmark on one corpus and model: a guide
for a site choosing its budget, not a promise.
"""

from __future__ import annotations

import bisect
import math

# benchmarks/results/dp_utility_vs_units.json (tests/privacy/test_expected_utility.py
# checks that this table is that file's): SmolLM2-135M-Instruct, one site on gcide:entries
# (one unit per dictionary entry), 12 steps of an expected 64 units × 24 tokens, C = 0.1,
# FFA-LoRA, lr 0.01, δ = min(1e-5, 1/(10 N)); one run per point.
MEASURED_ON = ("gcide:entries (GCIDE dictionary entries), SmolLM2-135M-Instruct, 12 steps × "
               "64 units × 24 tokens")
KEPT: dict[int, dict[float, float]] = {
    926: {1.0: 0.5684, 4.0: 0.6893, 8.0: 0.7193},
    8926: {1.0: 0.6674, 4.0: 0.6877, 8.0: 0.7262},
    90439: {1.0: 0.6837, 4.0: 0.7131, 8.0: 0.7451},
}


def expected_share(units: int, epsilon: float,
                   table: dict[int, dict[float, float]] | None = None) -> float | None:
    """The interpolated share of DP-off adaptation kept at ``units`` and ``epsilon``, or
    None outside the measured ranges of N and ε (``table`` defaults to :data:`KEPT`; every
    N must have been measured at the same ε values)."""
    table = KEPT if table is None else table
    if units <= 0 or epsilon <= 0:
        raise ValueError(f"units {units} and ε {epsilon} must be positive")
    sizes = sorted(table)
    if not sizes:
        raise ValueError("no measured table to interpolate")
    budgets = sorted(table[sizes[0]])
    if any(sorted(table[n]) != budgets for n in sizes):
        raise ValueError("every N of the table must be measured at the same ε values")
    if not (sizes[0] <= units <= sizes[-1] and budgets[0] <= epsilon <= budgets[-1]):
        return None
    logs = [math.log(n) for n in sizes]
    i, u = _bracket(logs, math.log(units))
    j, v = _bracket(budgets, epsilon)
    lo, hi = table[sizes[i]], table[sizes[min(i + 1, len(sizes) - 1)]]
    e0, e1 = budgets[j], budgets[min(j + 1, len(budgets) - 1)]
    return ((1 - u) * ((1 - v) * lo[e0] + v * lo[e1])
            + u * ((1 - v) * hi[e0] + v * hi[e1]))


def _bracket(grid: list[float], x: float) -> tuple[int, float]:
    """Index of the grid cell holding ``x`` and ``x``'s position in it (0 … 1)."""
    i = max(0, min(bisect.bisect_right(grid, x) - 1, len(grid) - 2))
    if len(grid) == 1:
        return 0, 0.0
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


def expected_share_line(units: int, epsilon: float,
                        table: dict[int, dict[float, float]] | None = None) -> str:
    """One line for ``fedcpt site check``."""
    table = KEPT if table is None else table
    head = f"expected share of DP-off adaptation at ε={epsilon:g} for N={units:,} units: "
    share = expected_share(units, epsilon, table)
    if share is None:
        sizes, budgets = sorted(table), sorted(next(iter(table.values())))
        return head + (f"outside the measured range (N {sizes[0]:,}-{sizes[-1]:,}, "
                       f"ε {budgets[0]:g}-{budgets[-1]:g}; {MEASURED_ON})")
    return head + f"~{100 * share:.0f}% (interpolated from benchmarks measured on {MEASURED_ON})"
