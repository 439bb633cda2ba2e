"""Metrics of a continual stream (``[[phases]]``): loss matrix, backward and forward
transfer, and general forgetting per phase.

All are held-out losses in nats (lower is better), so every transfer is a loss change:

- ``loss_matrix[i][j]``: token-weighted domain loss on phase j's sites (their held-out
  blocks) after the last round of phase i; ``base_loss[j]``: the base model's.
- ``bwt`` = mean over j < T−1 of (R[T−1][j] − R[j][j]): how much the loss on earlier
  phases rose after they were trained. **Positive = forgetting** (the sign of this
  project's general ``forgetting``; accuracy-based BWT, Lopez-Paz & Ranzato 2017, has the
  opposite sign).
- ``fwt`` = mean over j ≥ 1 of (R[j−1][j] − base_loss[j]): how the phases before j moved
  the loss on phase j before it was trained. **Negative = positive transfer.**
- ``phase_adaptation[j]`` = base_loss[j] − R[j][j]: what phase j's own training gained on
  its sites (the diagonal against the base). **Positive = learned.**
- ``general_forgetting[i]``: general loss after phase i − base general loss.
"""

from __future__ import annotations

import logging
from typing import Any

from fedcpt.config import Phase, RunConfig
from fedcpt.strategies.base import SiteEvalReport

log = logging.getLogger(__name__)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _phase_loss(reports: list[SiteEvalReport], sites: tuple[str, ...],
                base: bool = False) -> float | None:
    """Token-weighted loss of the reports from ``sites`` (None if none reported)."""
    chosen = [r for r in reports if r.site in sites]
    tokens = sum(r.tokens for r in chosen)
    if not tokens:
        return None
    return sum((r.base_loss if base else r.loss) * r.tokens for r in chosen) / tokens


def continual_metrics(cfg: RunConfig, evals: dict[int, list[SiteEvalReport]],
                      general_loss: dict[int, float]) -> dict[str, Any]:
    """The stream's metrics from per-round site evaluations and general losses."""
    plan: list[Phase] = cfg.phase_plan()
    matrix: list[list[float | None]] = []
    for row_phase in plan:
        reports = evals.get(row_phase.last_round, [])
        missing = sorted({s.name for s in cfg.sites} - {r.site for r in reports})
        if missing:
            log.warning("phase %s: sites %s did not report a domain loss after its last "
                        "round; the loss matrix leaves them out", row_phase.name, missing)
        matrix.append([_phase_loss(reports, ph.sites) for ph in plan])
    first: dict[str, SiteEvalReport] = {}  # each site's base loss, once
    for server_round in sorted(evals):
        for r in evals[server_round]:
            first.setdefault(r.site, r)
    base = [_phase_loss(list(first.values()), ph.sites, base=True) for ph in plan]
    last = len(plan) - 1

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    bwt = _mean([diff(matrix[last][j], matrix[j][j]) for j in range(last)])
    fwt = _mean([diff(matrix[j - 1][j], base[j]) for j in range(1, last + 1)])
    return {
        "phases": [{"name": ph.name, "first_round": ph.first_round,
                    "last_round": ph.last_round, "sites": list(ph.sites)} for ph in plan],
        "loss_matrix": matrix,
        "base_loss": base,
        "bwt": bwt,
        "fwt": fwt,
        "phase_adaptation": [diff(base[j], matrix[j][j]) for j in range(len(plan))],
        "general_forgetting": [diff(general_loss.get(ph.last_round), general_loss.get(0))
                               for ph in plan],
        "sign_convention": "losses in nats, lower is better: bwt > 0 means forgetting of "
                           "earlier phases, fwt < 0 means earlier phases helped later ones",
    }
