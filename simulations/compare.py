"""The continual-strategies grid: plain FedAvg and each protection, with DP off and on,
the DP arms at one or more budgets ε (the privacy–utility frontier).

Every arm is an ordinary simulation of the same scenario with a few overrides, so its run
folder is a normal run. The comparison reports, for each arm, forgetting and adaptation
beside the plain-FedAvg reference with the same DP setting, the share of FedAvg's
forgetting it removes and of its adaptation it keeps, and a forgetting-vs-adaptation plot.
With several budgets, ``frontier.png`` plots adaptation and forgetting against ε at fixed
compute (every DP arm runs the same steps; only the planned noise differs), with the
non-DP runs as lines.
Forgetting removed is reported apart for the general kinds in the rehearsal pool, those
outside it, and behaviour (KL to the base model, loss on the base model's own answers).
The ``default-run`` arm runs the default scenario as shipped (DP, SecAgg+, protection)
beside plain FedAvg without DP: the product against its reference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from fedcpt.config import load_config  # noqa: E402
from fedcpt.exceptions import ConfigError  # noqa: E402
from fedcpt.privacy.heldout import share_splits  # noqa: E402
from fedcpt.simulations.runner import prepare, simulate_many  # noqa: E402

log = logging.getLogger(__name__)

ARMS: dict[str, list[str]] = {
    "fedavg": [],
    "rehearsal-mix": ["strategy.rehearsal=mix"],
    "rehearsal-finetune": ["strategy.rehearsal=finetune"],
    "fedprox": ["strategy.anchor=fedprox"],
    "l2sp": ["strategy.anchor=l2sp"],
    "ewc": ["strategy.anchor=ewc"],
    "phase-anchor": ["strategy.anchor=phase"],
    "phase-distill": ["strategy.distillation=pool", "strategy.distill_teacher=phase"],
    "phase-replay": ["strategy.distillation=samples", "strategy.distill_teacher=phase"],
    "delta-scaling": ["strategy.delta_scaling=true"],
    "self-distill": ["strategy.distillation=both"],
    "rehearsal-distill": ["strategy.rehearsal=mix", "strategy.distillation=both"],
}
DEFAULT_RUN = "default-run"
"""The arm that runs ``default_scenario`` as shipped, whatever ``--dp`` says (its own DP
settings), measured against plain FedAvg without DP."""
DP_EPSILON = 8.0  # the budget of a DP arm unless ``epsilons`` says otherwise
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
    epsilon: float | None = None
    """The DP arm's budget per site (None without DP)."""
    scenario: str | None = None
    """The arm's own scenario (the default run's); None: the compared one."""


def dp_on(epsilon: float) -> list[str]:
    return ["privacy.enabled=true", f"privacy.target_epsilon={epsilon:g}"]


def grid(arms: list[str], dp_settings: list[bool],
         epsilons: tuple[float, ...] = (DP_EPSILON,),
         default_scenario: str = "shakespeare") -> list[Arm]:
    """Every arm without DP and, with DP, at every budget in ``epsilons``; the default
    run (if asked for) once, as shipped, last."""
    unknown = [a for a in arms if a not in ARMS and a != DEFAULT_RUN]
    if unknown:
        raise ConfigError(f"unknown arms {unknown}; choose from {[*ARMS, DEFAULT_RUN]}")
    default = [Arm(DEFAULT_RUN, True, [], scenario=default_scenario)] \
        if DEFAULT_RUN in arms else []
    if default and False not in dp_settings:
        raise ConfigError(f"the {DEFAULT_RUN} arm is measured against plain FedAvg without "
                          "DP: include off in --dp")
    arms = [a for a in arms if a != DEFAULT_RUN]
    bad = [e for e in epsilons if not e > 0]
    if not epsilons or bad:
        raise ConfigError(f"epsilons must be one or more budgets > 0; got {list(epsilons)}")
    if "fedavg" not in arms:
        arms = ["fedavg", *arms]  # the reference every arm is measured against
    budgets = {False: [None], True: list(epsilons)}
    # "off" must mean off even for a scenario that turns DP on (shakespeare-dp)
    return [Arm(a, dp, ARMS[a] + (dp_on(eps) if dp else ["privacy.enabled=false"]), eps)
            for dp in dp_settings for eps in budgets[dp] for a in arms] + default


def _folder(arm: Arm, single_budget: bool) -> str:
    if not arm.dp or arm.scenario:
        return arm.name
    return f"{arm.name}-dp" if single_budget else f"{arm.name}-dp-eps{arm.epsilon:g}"


def share(part: float | None, whole: float | None) -> float | None:
    """``part`` as a share of a positive ``whole`` (None when the whole gained nothing: a
    share of nothing says nothing, and two losses would divide into a gain)."""
    return None if part is None or whole is None or whole <= 0 else part / whole


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


def arm_row(arm: Arm, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One arm's measures from its run's summary (``bwt``: a stream's backward transfer,
    None for a scenario without phases)."""
    return {
        "arm": arm.name, "strategy": arm.overrides[: len(ARMS.get(arm.name, []))],
        "dp": arm.dp, "target_epsilon": arm.epsilon,
        "epsilon": summary["privacy"]["max_epsilon"] if arm.dp else None,
        "forgetting": summary["forgetting"], "adaptation": summary["adaptation"],
        "retention": retention_measures(summary),
        "bwt": (summary.get("continual") or {}).get("bwt"),
        "phase_adaptation": (summary.get("continual") or {}).get("phase_adaptation"),
        "run_dir": str(run_dir),
    }


def against_reference(rows: list[dict[str, Any]]) -> None:
    """Add to each row its plain-FedAvg reference (same DP setting and budget) and the
    shares of the reference's damage it removes and of its adaptation it keeps."""
    for row in rows:
        dp, budget = (False, None) if row["arm"] == DEFAULT_RUN else \
            (row["dp"], row["target_epsilon"])
        ref = next(r for r in rows if r["arm"] == "fedavg" and r["dp"] == dp
                   and r["target_epsilon"] == budget)
        row["reference"] = {"forgetting": ref["forgetting"], "adaptation": ref["adaptation"]}
        row["forgetting_removed"] = share_removed(ref["forgetting"], row["forgetting"])
        row["adaptation_kept"] = share(row["adaptation"], ref["adaptation"])
        row["retention_removed"] = {k: share_removed(ref["retention"][k], v)
                                    for k, v in row["retention"].items()}
        row["bwt_removed"] = share_removed(ref["bwt"], row["bwt"])
        row["phase_adaptation_kept"] = None if None in (row["phase_adaptation"],
                                                        ref["phase_adaptation"]) else [
            share(a, r) for a, r in zip(row["phase_adaptation"], ref["phase_adaptation"],
                                        strict=True)]


def compare(scenario: str, out: Path, arms: list[str], dp_settings: list[bool],
            extra: list[str], config_file: Path | None = None,
            epsilons: tuple[float, ...] = (DP_EPSILON,),
            default_scenario: str = "shakespeare") -> dict[str, Any]:
    """Run every arm, write compare.json, compare.md and pareto.png into ``out`` (and
    frontier.png when the DP arms run at more than one budget)."""
    plan = grid(arms, dp_settings, epsilons, default_scenario)
    single = len(epsilons) == 1
    # each arm spends its own budget: never share ledgers between arms; but every arm's
    # sites hold out the same units as the first arm's (one salt), so that all arms are
    # measured on the same held-out blocks and train on the same units
    ledgers = [(out / _folder(arm, single) / "ledgers").resolve() for arm in plan]
    configs = [load_config(arm.scenario or scenario, config_file, arm.overrides + extra + [
        f"privacy.ledger_dir={folder}"]) for arm, folder in zip(plan, ledgers, strict=True)]
    # the default run's DP setting and budget are its scenario's own
    plan = [replace(arm, dp=cfg.privacy.enabled, epsilon=cfg.privacy.target_epsilon
                    if cfg.privacy.enabled else None) if arm.scenario else arm
            for arm, cfg in zip(plan, configs, strict=True)]
    out.mkdir(parents=True, exist_ok=True)  # every arm's config was valid: start
    jobs = []
    for i, (arm, cfg) in enumerate(zip(plan, configs, strict=True)):
        if i:  # arm 0's preflight recorded the split
            share_splits(ledgers[0], ledgers[i])
        log.info("compare · arm %s (DP %s)", arm.name,
                 f"on, ε = {arm.epsilon:g}" if arm.dp else "off")
        jobs.append(prepare(cfg, out / _folder(arm, single)))
    # every arm on one engine start: each further arm costs its work only
    summaries = simulate_many(jobs)
    rows = [arm_row(arm, summary, job.run_dir)
            for arm, summary, job in zip(plan, summaries, jobs, strict=True)]
    against_reference(rows)
    payload = {"scenario": scenario, "overrides": extra, "epsilons": list(epsilons),
               "arms": rows}
    (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    _plot(rows, out / "pareto.png")
    if True in dp_settings and not single:
        plot_frontier(rows, out / "frontier.png")
    _table(rows, out / "compare.md")
    return payload


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for dp, marker in ((False, "o"), (True, "s")):
        for r in (r for r in rows if r["dp"] == dp and r["adaptation"] is not None):
            ax.scatter(r["adaptation"], r["forgetting"], marker=marker)
            label = f"{r['arm']} (DP ε={r['target_epsilon']:g})" if dp else r["arm"]
            ax.annotate(label, (r["adaptation"], r["forgetting"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="adaptation (nats, higher is better)",
           ylabel="forgetting (nats, lower is better)",
           title="Forgetting vs adaptation (best: bottom right)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    """Adaptation and forgetting against the DP budget ε, one line per arm; each arm's
    non-DP run (if it ran) is a dashed line of the same colour."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6.5), sharex=True)
    names = list(dict.fromkeys(r["arm"] for r in rows if r["dp"]))
    for i, name in enumerate(names):
        colour = f"C{i}"
        dp_rows = sorted((r for r in rows if r["arm"] == name and r["dp"]),
                         key=lambda r: r["target_epsilon"])
        plain = next((r for r in rows if r["arm"] == name and not r["dp"]), None)
        for ax, key in ((top, "adaptation"), (bottom, "forgetting")):
            points = [(r["target_epsilon"], r[key]) for r in dp_rows if r[key] is not None]
            ax.plot([e for e, _ in points], [v for _, v in points], marker="s", color=colour,
                    label=f"{name} (DP)")
            if plain is not None and plain[key] is not None:
                ax.axhline(plain[key], color=colour, linestyle="--", linewidth=1,
                           label=f"{name} (no DP)")
    top.set(ylabel="adaptation (nats, higher is better)",
            title="Privacy–utility frontier at fixed compute")
    bottom.set(xlabel="ε per site (δ at the site's default)", xscale="log",
               ylabel="forgetting (nats, lower is better)")
    bottom.set_xticks(sorted({r["target_epsilon"] for r in rows if r["dp"]}))
    bottom.xaxis.set_major_formatter(ScalarFormatter())
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7)
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
    if any(r["bwt"] is not None for r in rows):
        lines += ["", "Backward transfer over the stream's phases (positive: earlier phases "
                  "forgotten; share of plain FedAvg's removed) and each phase's own "
                  "adaptation kept:", "",
                  "| arm | DP | BWT | BWT removed | each phase's adaptation kept |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['arm']} | {'on' if r['dp'] else 'off'} | {_signed(r['bwt'])} | "
                  f"{_pct(r['bwt_removed'])} | "
                  f"{', '.join(_pct(k) for k in r['phase_adaptation_kept'] or [])} |"
                  for r in rows]
    lines += ["", "![pareto](pareto.png)", ""]
    path.write_text("\n".join(lines))
