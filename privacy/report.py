"""Privacy budget reports from site ledgers: a table, Markdown, JSON and an ε-per-round plot.

Works on a run folder (its ``ledgers/``), a folder of ledgers, or one site's own ledger
file — so a data site can audit its spend without the server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedcpt.privacy.accounting import epsilon  # noqa: E402
from fedcpt.privacy.gate import (  # noqa: E402
    Mode,
    release_rows,
    released_paths,
    site_modes,
)
from fedcpt.privacy.ledger import LedgerError, PrivacyLedger  # noqa: E402
from fedcpt.privacy.policy import N_DEPENDENT_NOTE  # noqa: E402
from fedcpt.privacy.secagg.site_level_record import (  # noqa: E402
    RECORD_SUFFIX,
    load_releases,
    record_path,
    site_level_epsilon,
)
from fedcpt.privacy.site_files import LEDGER_SUFFIX  # noqa: E402

STATEMENT = (
    "Unit-level differential privacy at each site: the unit is named by the site's own "
    "policy (a document, a file, a folder, or every record sharing a field such as "
    "patient_id), and no training block spans two units. Each DP-SGD step Poisson-samples "
    "units, takes one block from each sampled unit, clips its gradient and adds Gaussian "
    "noise, so ε bounds what the adapter updates reveal about any one unit. ε is "
    "cumulative over every step and noised evaluation release in the site's ledger (all "
    "rounds, restarts and phases), at the site's δ. Sites hold disjoint data, so the "
    "federation's ε is the maximum over sites; aggregation and anything the server does "
    "with the adapters are post-processing, as is a site's data drift (its released base "
    "loss minus the mean of its earlier runs': covered by ε exactly when those "
    "were noised). Not covered: one person whose text sits in "
    "several units or at several sites (unless the unit is that person), quantities listed "
    "below as not covered, and any text shared outside training.")


# What no reply key carries: listed beside the gate's table, which holds every key.
UNKEYED = (
    "reply timing (Flower's message timestamps, arrival time): NOT covered by ε — the time "
    "a round takes at the site depends on the Poisson batch sizes, and fedcpt does not "
    "pad it",
    "refusals: one generic sentence per error code (the reason stays in the site's log); "
    "whether a site refuses depends on public parameters (the run config, its policy, "
    "which sums it already joined) or is decided after the spend — except where listed "
    "in docs/privacy.md",
)


def site_modes_of(ledger: PrivacyLedger) -> tuple[Mode, ...]:
    """The replies a DP site with this ledger can send (DP-SGD; with or without
    site-level noise under SecAgg+), under its recorded evaluation policy."""
    release = ledger.policy.get("eval_release", {}).get("value", "nothing")
    return (*site_modes(True, False, release), *site_modes(True, True, release))


def release_list(modes: tuple[Mode, ...]) -> list[str]:
    """The release list, produced from the release gate's own table
    (:mod:`fedcpt.privacy.gate`): every key a reply in ``modes`` sends, with its class."""
    seen, lines = set(), []
    for mode in modes:
        for row in release_rows(mode):
            line = row.line()
            if (row.path, row.cls, row.why) not in seen:
                seen.add((row.path, row.cls, row.why))
                lines.append(line)
    return lines + list(UNKEYED)


def released_keys(eval_release: str) -> frozenset[str]:
    """Every reply key (record names and the keys inside them) the gate sends for a DP
    site whose policy is ``eval_release``."""
    modes = (*site_modes(True, False, eval_release), *site_modes(True, True, eval_release))
    return frozenset(part for path in released_paths(modes) for part in path.split("."))


def site_table(sites: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of per-site ε, δ, steps, σ and q."""
    lines = ["| site | unit | ε | ε (RDP) | δ | steps | σ | q |",
             "|---|---|---|---|---|---|---|---|"]
    for site, r in sites.items():
        sigma = "n/a" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4f}"
        q = "n/a" if r["sample_rate"] is None else f"{r['sample_rate']:.5f}"
        lines.append(f"| {site} | {r['unit']} | {r['epsilon']:.3f} | "
                     f"{r['epsilon_rdp']:.3f} | {r['delta']:.3g} | {r['steps']} | {sigma} | "
                     f"{q} |")
    return lines


def _ledger_folder(path: Path) -> Path:
    return path / "ledgers" if (path / "ledgers").is_dir() else path


def find_ledgers(path: Path, required: bool = True) -> list[PrivacyLedger]:
    """Ledgers at ``path``: a ledger file, a folder of them, or a run folder (LedgerError
    when there is none and ``required``)."""
    path = Path(path)
    if path.is_file():
        return [PrivacyLedger.load(path)]
    folder = _ledger_folder(path)
    files = sorted(folder.glob(f"*{LEDGER_SUFFIX}")) if folder.is_dir() else []
    if not files and required:
        raise LedgerError(f"no privacy ledgers found at {path}")
    return [PrivacyLedger.load(f) for f in files]


def find_site_level(path: Path) -> dict[str, dict[str, Any]]:
    """Each site's own count of its distributed-DP releases at ``path`` (beside a ledger
    file, or in a folder of ledgers or a run folder), composed: site → row."""
    path = Path(path)
    files = ([record_path(path)] if path.is_file() else
             sorted(_ledger_folder(path).glob(f"*{RECORD_SUFFIX}")))
    rows = {}
    for file in files:
        if releases := load_releases(file):
            eps, delta = site_level_epsilon(releases)
            rows[file.name.removesuffix(RECORD_SUFFIX)] = {
                "releases": len(releases), "runs": len({r.run for r in releases}),
                "epsilon": eps, "delta": delta}
    return rows


def site_row(ledger: PrivacyLedger) -> dict[str, Any]:
    trained = [e for e in ledger.entries if e.kind == "train"]
    last = trained[-1] if trained else None
    eps = ledger.epsilon()
    public = ledger.public_units
    bound = ledger.epsilon_bound() if public else eps
    return {
        "site": ledger.site,
        "unit": ledger.unit,
        "policy": ledger.policy,
        "releases": release_list(site_modes_of(ledger)),
        "eval_releases": sum(e.steps for e in ledger.entries if e.kind == "eval"),
        "epsilon": eps,
        "epsilon_rdp": ledger.epsilon("rdp"),
        "delta": ledger.delta,
        "steps": ledger.steps,
        "rounds": len(ledger.entries),
        "noise_multiplier": last.noise_multiplier if last else None,
        "sample_rate": last.sample_rate if last else None,
        "accountant": ledger.accountant,
        "target_epsilon": ledger.target_epsilon,
        "budget_left": max(0.0, ledger.target_epsilon - eps),
        "public_units": public,
        "epsilon_decisions": bound,
        "decisions": decisions_statement(public, bound),
    }


def decisions_statement(public_units: int, bound: float) -> str:
    """What the site's noise plan and budget refusals were decided on."""
    if not public_units:
        return N_DEPENDENT_NOTE[0].upper() + N_DEPENDENT_NOTE[1:] + "."
    return (f"σ and budget refusals are decided on ε at the public rates batch / public-units "
            f"({public_units}): that bound stands at ε ≤ {bound:.3f}, never below the real ε "
            "above, and depends on public values only (entries recorded without public-units "
            "count at q = 1).")


def epsilon_per_round(ledger: PrivacyLedger) -> list[float]:
    """Cumulative ε after each recorded round."""
    history = ledger.history
    return [epsilon(history[: i + 1], ledger.delta, ledger.accountant)
            for i in range(len(history))]


def write_privacy_report(ledgers: list[PrivacyLedger], out_dir: Path,
                         site_level: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write privacy.json, privacy_report.md and privacy_epsilon.png; return the JSON.
    ``site_level``: the sites' own counts of their distributed-DP releases
    (:func:`find_site_level`), reported beside the unit-level ledgers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [site_row(ledger) for ledger in ledgers]
    curves = {ledger.site: epsilon_per_round(ledger) for ledger in ledgers}
    payload = {
        "sites": {r["site"]: r for r in rows},
        "max_epsilon": max((r["epsilon"] for r in rows), default=None),
        "level": "unit",
        "units": sorted({r["unit"] for r in rows}),
        "epsilon_per_round": curves,
        "site_level": site_level or {},
        "statement": STATEMENT,
    }
    (out_dir / "privacy.json").write_text(json.dumps(payload, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for site, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=site)
    for target in sorted({r["target_epsilon"] for r in rows}):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="recorded round", ylabel="cumulative ε", title="Privacy spent per site")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "privacy_epsilon.png", dpi=110)
    plt.close(fig)

    federation = ("no site keeps a unit-level ledger here" if not rows else
                  f"**{payload['max_epsilon']:.3f}** (max over sites; units: "
                  f"{', '.join(payload['units'])})")
    lines = ["# Privacy budget report", "", STATEMENT, "",
             f"Federation unit-level ε: {federation}.",
             "", *site_table(payload["sites"]), "",
             "| site | accountant | budget | left | rounds |", "|---|---|---|---|---|"]
    lines += [f"| {r['site']} | {r['accountant']} | {r['target_epsilon']} | "
              f"{r['budget_left']:.3f} | {r['rounds']} |" for r in rows]
    for r in rows:
        lines += ["", f"## Site {r['site']}: what it releases", ""]
        lines += [f"- {item}" for item in r["releases"]]
        lines += ["", f"Noise plan and refusals: {r['decisions']}"]
        if r["policy"]:
            lines += ["", "| policy | value | set by |", "|---|---|---|"]
            lines += [f"| {k} | {v['value']} | {v['set_by']} |" for k, v in r["policy"].items()]
    if payload["site_level"]:
        lines += ["", "## Site-level DP, counted by each site over every run", "",
                  "Each masked update a site noised itself under secure aggregation "
                  "(distributed DP), as the site recorded it before it left, whatever run id "
                  "the server used.", "",
                  "| site | noised updates | runs | site-level ε | δ |", "|---|---|---|---|---|"]
        lines += [f"| {site} | {v['releases']} | {v['runs']} | {v['epsilon']:.3f} | "
                  f"{v['delta']:g} |" for site, v in payload["site_level"].items()]
    lines += ["", "![ε per round](privacy_epsilon.png)", ""]
    (out_dir / "privacy_report.md").write_text("\n".join(lines))
    return payload
