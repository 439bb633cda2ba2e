"""DP utility: how much of plain FedAvg's adaptation a DP run keeps, and at what cost.

Two ordinary simulations run side by side: a non-DP reference scenario as shipped and a
DP scenario. Adaptation is the base domain loss minus the final domain loss (what the
run summary reports); *kept* is the DP run's adaptation over the reference's. The wall
time ratio compares the two runs end to end (start-up, training and evaluation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedcpt.config import RunConfig, load_config
from fedcpt.privacy.heldout import share_splits
from fedcpt.simulations.compare import share
from fedcpt.simulations.runner import simulate

log = logging.getLogger(__name__)

# Issue 11's first milestone on a 2-core CPU: DP at ε = 8 per unit keeps this much of the
# non-DP adaptation, within this multiple of its wall time.
KEPT_GOAL = 0.6
WALL_RATIO_GOAL = 3.0


@dataclass(frozen=True)
class UtilityArm:
    """One run of the comparison: what ran and what it measured."""

    scenario: str
    overrides: list[str]
    settings: dict[str, Any]
    adaptation: float | None
    forgetting: float
    forgetting_standard_error: float
    domain_loss: dict[str, Any]
    general_loss: dict[str, float]
    wall_s: float
    privacy: dict[str, Any] | None
    run_dir: str


def settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that decide a run's utility under DP (and its cost)."""
    p, t = cfg.privacy, cfg.train
    return {
        "model": cfg.model.name, "precision": cfg.model.precision,
        "rounds": cfg.federation.rounds, "sites": [s.name for s in cfg.sites],
        "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr, "schedule": cfg.train.schedule,
        "min_lr_ratio": cfg.train.min_lr_ratio, "max_update_norm": cfg.federation.max_update_norm,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                 "target_modules": list(cfg.lora.target_modules)},
        "privacy": ({"target_epsilon": p.target_epsilon, "max_grad_norm": p.max_grad_norm,
                     "max_physical_batch_size": t.max_physical_batch_size,
                     "ffa_lora": p.ffa_lora, "accountant": p.accountant,
                     "unit": cfg.site_policy.unit} if p.enabled else None),
    }


def _privacy(summary: dict[str, Any]) -> dict[str, Any] | None:
    """ε and δ per unit at each site, as the sites reported them."""
    section = summary.get("privacy")
    if section is None:
        return None
    return {"max_epsilon": section["max_epsilon"], "max_delta": section["max_delta"],
            "accountant": section["accountant"], "level": section["level"],
            "sites": section["sites"]}


def run_arm(scenario: str, run_dir: Path, overrides: list[str],
            config_file: Path | None = None) -> UtilityArm:
    """Simulate ``scenario`` (with ``overrides``) in ``run_dir``, timing it end to end."""
    cfg = load_config(scenario, config_file, overrides)
    log.info("dp utility · %s (DP %s)", scenario, "on" if cfg.privacy.enabled else "off")
    start = time.perf_counter()
    summary = simulate(cfg, run_dir)
    wall = time.perf_counter() - start
    return UtilityArm(
        scenario=scenario, overrides=list(overrides), settings=settings(cfg),
        adaptation=summary["adaptation"], forgetting=summary["forgetting"],
        forgetting_standard_error=summary["forgetting_standard_error"],
        domain_loss=summary["domain_loss"], general_loss=summary["general_loss"],
        wall_s=wall, privacy=_privacy(summary), run_dir=str(run_dir))


def compare_utility(reference: UtilityArm, dp: UtilityArm) -> dict[str, Any]:
    """The side-by-side report: adaptation kept, wall-time ratio, ε spent, forgetting."""
    kept = share(dp.adaptation, reference.adaptation)
    ratio = dp.wall_s / reference.wall_s
    epsilon = dp.privacy["max_epsilon"] if dp.privacy else None
    return {
        "reference": asdict(reference),
        "dp": asdict(dp),
        "adaptation_kept": kept,
        "wall_time_ratio": ratio,
        "epsilon_per_unit": epsilon,
        "delta_per_unit": dp.privacy["max_delta"] if dp.privacy else None,
        "forgetting": {"reference": reference.forgetting, "dp": dp.forgetting},
        "goals": {"adaptation_kept": KEPT_GOAL, "wall_time_ratio": WALL_RATIO_GOAL},
        "goals_met": {"adaptation_kept": kept is not None and kept >= KEPT_GOAL,
                      "wall_time_ratio": ratio <= WALL_RATIO_GOAL},
    }


def dp_utility(out: Path, reference: str, dp: str, overrides: list[str],
               config_file: Path | None = None) -> dict[str, Any]:
    """Run ``reference`` then ``dp`` (each with ``overrides``) under ``out``; the report.
    Each keeps its ledgers in its own run folder (the DP run spends a fresh budget), and
    the DP run's sites start from the reference's split records, so both hold out the
    same units and are measured on the same blocks."""
    ledgers = {name: (out / name / "ledgers").resolve() for name in (reference, dp)}
    ref_arm = run_arm(reference, out / reference,
                      [*overrides, f"privacy.ledger_dir={ledgers[reference]}"], config_file)
    share_splits(ledgers[reference], ledgers[dp])
    dp_arm = run_arm(dp, out / dp, [*overrides, f"privacy.ledger_dir={ledgers[dp]}"],
                     config_file)
    return compare_utility(ref_arm, dp_arm)
