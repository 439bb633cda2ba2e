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
from fedcpt.privacy.ledger import LEDGER_SUFFIX, LedgerError, PrivacyLedger  # noqa: E402

STATEMENT = (
    "Record-level differential privacy: each site trains with DP-SGD (Poisson sampling, "
    "per-block clipping, Gaussian noise), and a record is one packed block of tokens of the "
    "site's own training data. ε is cumulative over every DP-SGD step in the site's ledger "
    "(all rounds, restarts and phases). Sites hold disjoint data, so the federation's "
    "record-level ε is the maximum over sites; aggregation and anything the server does "
    "with the adapters are post-processing. Not covered: user-level privacy when one "
    "person's text spans many blocks or several sites; the held-out evaluation losses each "
    "site reports (held-out blocks are never trained on, but their losses are released "
    "without noise); and any text shared outside training.")


def site_table(sites: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of per-site ε, δ, steps, σ and q."""
    lines = ["| site | ε | ε (RDP) | δ | steps | σ | q |", "|---|---|---|---|---|---|---|"]
    for site, r in sites.items():
        sigma = "n/a" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4f}"
        q = "n/a" if r["sample_rate"] is None else f"{r['sample_rate']:.5f}"
        lines.append(f"| {site} | {r['epsilon']:.3f} | {r['epsilon_rdp']:.3f} | "
                     f"{r['delta']:.3g} | {r['steps']} | {sigma} | {q} |")
    return lines


def find_ledgers(path: Path) -> list[PrivacyLedger]:
    """Ledgers at ``path``: a ledger file, a folder of them, or a run folder."""
    path = Path(path)
    if path.is_file():
        return [PrivacyLedger.load(path)]
    folder = path / "ledgers" if (path / "ledgers").is_dir() else path
    files = sorted(folder.glob(f"*{LEDGER_SUFFIX}")) if folder.is_dir() else []
    if not files:
        raise LedgerError(f"no privacy ledgers found at {path}")
    return [PrivacyLedger.load(f) for f in files]


def site_row(ledger: PrivacyLedger) -> dict[str, Any]:
    last = ledger.entries[-1] if ledger.entries else None
    eps = ledger.epsilon()
    return {
        "site": ledger.site,
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
    }


def epsilon_per_round(ledger: PrivacyLedger) -> list[float]:
    """Cumulative ε after each recorded round."""
    history = ledger.history
    return [epsilon(history[: i + 1], ledger.delta, ledger.accountant)
            for i in range(len(history))]


def write_privacy_report(ledgers: list[PrivacyLedger], out_dir: Path) -> dict[str, Any]:
    """Write privacy.json, privacy_report.md and privacy_epsilon.png; return the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [site_row(ledger) for ledger in ledgers]
    curves = {ledger.site: epsilon_per_round(ledger) for ledger in ledgers}
    payload = {
        "sites": {r["site"]: r for r in rows},
        "max_epsilon": max(r["epsilon"] for r in rows),
        "level": "record",
        "epsilon_per_round": curves,
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "privacy_epsilon.png", dpi=110)
    plt.close(fig)

    lines = ["# Privacy budget report", "", STATEMENT, "",
             f"Federation record-level ε = **{payload['max_epsilon']:.3f}** (max over sites).",
             "", *site_table(payload["sites"]), "",
             "| site | accountant | budget | left | rounds |", "|---|---|---|---|---|"]
    lines += [f"| {r['site']} | {r['accountant']} | {r['target_epsilon']} | "
              f"{r['budget_left']:.3f} | {r['rounds']} |" for r in rows]
    lines += ["", "![ε per round](privacy_epsilon.png)", ""]
    (out_dir / "privacy_report.md").write_text("\n".join(lines))
    return payload
