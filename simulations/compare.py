"""The continual-strategies grid: plain FedAvg and each protection, with DP off and on.

Every arm is an ordinary simulation of the same scenario with a few overrides, so its run
folder is a normal run. The comparison reports, for each arm, forgetting and adaptation
beside the plain-FedAvg reference with the same DP setting, the share of FedAvg's
forgetting it removes and of its adaptation it keeps, and a forgetting-vs-adaptation plot.
Forgetting removed is reported apart for the general kinds in the rehearsal pool, those
outside it, and behaviour (KL to the base model, loss on the base model's own answers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedcpt.config import load_config  # noqa: E402
from fedcpt.exceptions import ConfigError  # noqa: E402
from fedcpt.simulations.runner import simulate  # noqa: E402

log = logging.getLogger(__name__)

ARMS: dict[str, list[str]] = {
    "fedavg": [],
    "rehearsal-mix": ["strategy.rehearsal=mix"],
    "rehearsal-finetune": ["strategy.rehearsal=finetune"],
    "fedprox": ["strategy.anchor=fedprox"],
    "l2sp": ["strategy.anchor=l2sp"],
    "ewc": ["strategy.anchor=ewc"],
    "delta-scaling": ["strategy.delta_scaling=true"],
    "self-distill": ["strategy.distillation=both"],
    "rehearsal-distill": ["strategy.rehearsal=mix", "strategy.distillation=both"],
}
DP_ON = ["privacy.enabled=true", "privacy.target_epsilon=8"]
# Retention measures of a summary's `retention` section: (group, field); each is 0 at the
# base model and higher is worse, so "removed" is the share of FedAvg's value taken away.
RETENTION = {
    "in_pool_forgetting": ("in_pool", "forgetting"),
    "out_of_pool_forgetting": ("out_of_pool", "forgetting"),
    "kl_to_base": ("behaviour", "kl_to_base"),
    "answer_loss_increase": ("behaviour", "answer_loss_increase"),
}


@dataclass(frozen=True)
class Arm:
    name: str
    dp: bool
    overrides: list[str]


def grid(arms: list[str], dp_settings: list[bool]) -> list[Arm]:
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if "fedavg" not in arms:
        arms = ["fedavg", *arms]  # the reference every arm is measured against
    return [Arm(a, dp, ARMS[a] + (DP_ON if dp else [])) for dp in dp_settings for a in arms]


def _folder(arm: Arm) -> str:
    return f"{arm.name}{'-dp' if arm.dp else ''}"


def share(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else part / whole


def share_removed(reference: float | None, value: float | None) -> float | None:
    """Share of the reference's (positive) damage that ``value`` removes; None when the
    reference did no damage to remove."""
    if reference is None or value is None or reference <= 0:
        return None
    return (reference - value) / reference


def retention_measures(summary: dict[str, Any]) -> dict[str, float | None]:
    """The :data:`RETENTION` measures of one run's summary (None where not measured)."""
    retention = summary.get("retention") or {}
    return {name: (retention.get(group) or {}).get(key)
            for name, (group, key) in RETENTION.items()}


def compare(scenario: str, out: Path, arms: list[str], dp_settings: list[bool],
            extra: list[str], config_file: Path | None = None) -> dict[str, Any]:
    """Run every arm, write compare.json, compare.md and pareto.png into ``out``."""
    plan = grid(arms, dp_settings)
    # each arm spends its own budget: never share ledgers between arms
    configs = [load_config(scenario, config_file, arm.overrides + extra + [
        f"privacy.ledger_dir={(out / _folder(arm) / 'ledgers').resolve()}"]) for arm in plan]
    out.mkdir(parents=True, exist_ok=True)  # every arm's config was valid: start
    rows = []
    for arm, cfg in zip(plan, configs, strict=True):
        run_dir = out / _folder(arm)
        log.info("compare · arm %s (DP %s)", arm.name, "on" if arm.dp else "off")
        s = simulate(cfg, run_dir)
        rows.append({
            "arm": arm.name, "strategy": arm.overrides[: len(ARMS[arm.name])],
            "dp": arm.dp,
            "epsilon": s["privacy"]["max_epsilon"] if arm.dp else None,
            "forgetting": s["forgetting"], "adaptation": s["adaptation"],
            "retention": retention_measures(s),
            "run_dir": str(run_dir),
        })
    for row in rows:
        ref = next(r for r in rows if r["arm"] == "fedavg" and r["dp"] == row["dp"])
        row["reference"] = {"forgetting": ref["forgetting"], "adaptation": ref["adaptation"]}
        row["forgetting_removed"] = share_removed(ref["forgetting"], row["forgetting"])
        row["adaptation_kept"] = share(row["adaptation"], ref["adaptation"])
        row["retention_removed"] = {k: share_removed(ref["retention"][k], v)
                                    for k, v in row["retention"].items()}
    payload = {"scenario": scenario, "overrides": extra, "arms": rows}
    (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    _plot(rows, out / "pareto.png")
    _table(rows, out / "compare.md")
    return payload


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for dp, marker in ((False, "o"), (True, "s")):
        for r in (r for r in rows if r["dp"] == dp and r["adaptation"] is not None):
            ax.scatter(r["adaptation"], r["forgetting"], marker=marker)
            ax.annotate(f"{r['arm']}{' (DP)' if dp else ''}", (r["adaptation"], r["forgetting"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="adaptation (nats, higher is better)",
           ylabel="forgetting (nats, lower is better)",
           title="Forgetting vs adaptation (best: bottom right)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _table(rows: list[dict[str, Any]], path: Path) -> None:
    lines = ["| arm | DP | ε | forgetting | adaptation | forgetting removed | adaptation kept |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['arm']} | {'on' if r['dp'] else 'off'} | {eps} | "
                     f"{r['forgetting']:+.4f} | {_signed(r['adaptation'])} | "
                     f"{_pct(r['forgetting_removed'])} | {_pct(r['adaptation_kept'])} |")
    lines += ["", "Forgetting removed by kind group and behaviour (share of plain FedAvg's "
              "value; n/a where FedAvg did no damage):", "",
              "| arm | DP | in-pool forgetting | out-of-pool forgetting | KL to base "
              "| base-answer loss increase |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{_signed(r['retention'][k])} ({_pct(r['retention_removed'][k])})"
                 for k in RETENTION]
        lines.append(f"| {r['arm']} | {'on' if r['dp'] else 'off'} | {' | '.join(cells)} |")
    lines += ["", "![pareto](pareto.png)", ""]
    path.write_text("\n".join(lines))
