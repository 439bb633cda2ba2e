"""Drift alarms that act: the global update's norm and the general loss of each accepted
round against the last good rounds, and the rollback a threshold triggers.

Both signals are the server's own: the global update (the aggregate after the server
steps, which the server holds even under SecAgg, and which is DP post-processing under
site-level DP) and the general loss on the server's held-out blocks. The window is read
from the run's :class:`~fedcpt.runfolder.records.RoundRecord` rows, so a resumed run keeps
its baselines.

Per-site data drift is computed and released by the sites
(:mod:`fedcpt.privacy.data_drift`); :func:`check_data_drift` only compares what they sent
with ``monitor.data_drift_threshold`` and flags, never rolls back: a site whose data
changed has not sent a bad update, and its updates are still judged by the signals above.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from fedcpt.config import MonitorConfig
from fedcpt.runfolder.records import RoundRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drift:
    """One round's drift signals and what they triggered."""

    update_norm: float
    """L2 norm of the round's global update (new global minus the round's start)."""
    update_ratio: float | None
    """``update_norm`` over the median of the window's (None: no earlier update)."""
    general_loss_rise: float | None
    """General loss minus the window's lowest, in nats (None: no earlier version)."""
    flags: list[str] = field(default_factory=list)
    rolled_back_to: int | None = None
    """The version that replaced this round's adapter (None: no rollback)."""

    def to_dict(self) -> dict[str, Any]:
        return {"update_ratio": self.update_ratio,
                "general_loss_rise": self.general_loss_rise,
                "flags": list(self.flags), "rolled_back_to": self.rolled_back_to}


def good_rounds(rows: list[RoundRecord]) -> list[RoundRecord]:
    """The versions drift baselines are taken from: round 0 and every aggregated round
    that no alarm flagged."""
    return [r for r in rows if r.round == 0 or (r.aggregated and not r.drift.get("flags"))]


def check_drift(cfg: MonitorConfig, rows: list[RoundRecord], update_norm: float,
                general_loss: float | None) -> Drift:
    """The drift of a round whose global update has norm ``update_norm`` and whose new
    adapter has ``general_loss`` (None: not evaluated, ``federation.eval_every``), against
    the last ``cfg.window`` good rounds of ``rows`` (the rounds before it; the general
    loss against the last ``cfg.window`` good rounds that were evaluated)."""
    good = good_rounds(rows)
    window = good[-cfg.window:]
    norms = [r.update_norm for r in window if r.round and r.update_norm is not None]
    ratio = update_norm / statistics.median(norms) if norms and min(norms) > 0 else None
    losses = [r.general_loss for r in good if r.general_loss is not None][-cfg.window:]
    rise = general_loss - min(losses) if general_loss is not None and losses else None
    flags = []
    if cfg.update_drift and ratio is not None and ratio > cfg.update_drift:
        flags.append(f"update drift: norm {update_norm:.3f} is {ratio:.1f}× the window's "
                     f"median (threshold {cfg.update_drift:g}×)")
    if cfg.general_loss_drift and rise is not None and rise > cfg.general_loss_drift:
        flags.append(f"general-loss drift: +{rise:.3f} nats over the window's lowest "
                     f"(threshold {cfg.general_loss_drift:g})")
    target = good[-1].round if flags and cfg.action == "rollback" and good else None
    for flag in flags:
        log.warning("drift: %s%s", flag, "" if target is None else
                    f"; rolling back to version {target}")
    return Drift(update_norm, ratio, rise, flags, target)


def check_data_drift(cfg: MonitorConfig, rows: list[RoundRecord],
                     per_site: dict[str, float]) -> list[str]:
    """Flags for the sites whose released data drift is beyond the threshold either way,
    each once a run: only in the first round its value arrives (a site with a value in an
    earlier round of ``rows`` is not flagged again; the value is the run's, every round)."""
    if not cfg.data_drift_threshold:
        return []
    seen = {site for r in rows for site in r.data_drift_per_site}
    flags = [f"data drift: site {site}'s data moved by {value:+.3f} nats against its "
             f"previous runs (threshold {cfg.data_drift_threshold:g})"
             for site, value in sorted(per_site.items())
             if site not in seen and abs(value) > cfg.data_drift_threshold]
    for flag in flags:
        log.warning("%s", flag)
    return flags
