"""Privacy budget reports from site ledgers: a table, Markdown, JSON and an ε-per-round plot.

Works on a run folder (its ``ledgers/``), a folder of ledgers, or one site's own ledger
file — so a data site can audit its spend without the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedcpt.core import protocol as p  # noqa: E402
from fedcpt.privacy.accounting import epsilon  # noqa: E402
from fedcpt.privacy.ledger import LEDGER_SUFFIX, LedgerError, PrivacyLedger  # noqa: E402
from fedcpt.privacy.secagg.site import STATE as SECAGG_STATE  # noqa: E402

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


@dataclass(frozen=True)
class Release:
    """One quantity a site sends the server, the reply keys that carry it, and whether the
    site's ε covers it."""

    what: str
    keys: tuple[str, ...]
    """Reply record names and metric keys (:mod:`fedcpt.core.protocol`); none for what no
    key carries."""
    coverage: str

    def line(self) -> str:
        return f"{self.what}: {self.coverage}"


# Everything a DP site's train, SecAgg+ stage and query replies carry. A key a reply gains
# must be listed here: tests/privacy/test_releases.py builds the real replies and checks.
RELEASES = (
    Release("adapter update (DP-SGD)", (p.ARRAYS, p.MASKED), "covered by ε"),
    Release("num-examples", (p.METRICS, p.NUM_EXAMPLES),
            "training: steps × expected batch, data-independent; noised evaluation: the "
            "query's units × block length, public; plain evaluation: its held-out token "
            "count, NOT covered by ε (as that release)"),
    Release("train-seconds", (p.TRAIN_SECONDS,),
            "not released under DP (sent as 0: it depends on Poisson batch sizes)"),
    Release("training loss", (p.TRAIN_LOSS,), "not released under DP"),
    Release("ε, ε (RDP), δ, σ, q and DP steps", p.PRIVACY_METRICS,
            "public: together they reveal N, the number of training units, which fedcpt "
            "treats as public"),
    Release("site name", (p.SITE, "name"), "public (the site's identity)"),
    Release("kind of privacy unit", ("unit",),
            "public (the site's policy: what one unit is, e.g. a document)"),
    Release("training attestation (signed Merkle root of the training units' hashes, "
            "policy digest, run id, round, received adapter digest, site certificate)",
            (p.ATTESTATION, "statement", "signature", "certificate"),
            "NOT covered by ε: a commitment to the exact training unit set. With a ledger "
            "the unit hashes are keyed with a secret site salt, so the root reveals nothing "
            "to anyone without it (the site may reveal the salt to prove what it attested); "
            "without a ledger it is unsalted, and anyone holding a candidate unit set can "
            "test whether it is exactly the site's. It also reveals N (public anyway)"),
    Release("SecAgg+ keys, certificate, encrypted shares and signatures",
            (SECAGG_STATE, "pk1", "pk2", "signature", "cert", "dst", "sealed", "nodes",
             "shares"),
            "random or public: independent of the data"),
    Release("reply timing (Flower's message timestamps, arrival time)", (),
            "NOT covered by ε: the time a round takes at the site depends on the Poisson "
            "batch sizes, and fedcpt does not pad it"),
    Release("refusals (budget exhausted, policy refused)", (),
            "functions of the public parameters"),
)
# A plain evaluate reply's keys; the masked evaluation reply's (under secure aggregation,
# whatever the release; the only evaluation a `secagg` site sends) carry the vector of
# fedcpt.privacy.secagg.eval_sum.
EVAL_KEYS = (p.METRICS, p.NUM_EXAMPLES, p.DOMAIN_LOSS, p.DOMAIN_BASE_LOSS, p.DOMAIN_ECE,
             p.DATA_DRIFT, p.SITE, "name")
SECURE_EVAL_KEYS = (p.MASKED, p.SITE, "name")
SECURE_EVAL = ("under secure aggregation, the held-out token count, loss × tokens, base "
               "loss × tokens, ECE × tokens (fixed point, clipped to the policy's range) and "
               "how many were clipped: masked, released only as a sum with the other sites'")
DRIFT_PLAIN = ("data drift (the base loss minus the mean of the site's earlier runs' released "
               "base losses; not sent under secure aggregation): released WITHOUT noise, NOT "
               "covered by ε")
EVAL_RELEASE = {
    "nothing": "evaluation: nothing released (no data drift either)",
    "plain": "evaluation loss, base loss, ECE: released WITHOUT noise, NOT covered by ε "
             f"(or, {SECURE_EVAL}); {DRIFT_PLAIN}",
    "noised": "evaluation loss, base loss, ECE: Gaussian mechanism on clipped per-unit "
              f"values, covered by ε (in the ledger) (or, {SECURE_EVAL}, still noised); data "
              "drift: computed from the noised base losses this run and earlier runs "
              "released, post-processing, covered by ε at no extra cost",
    "secagg": f"evaluation: only {SECURE_EVAL}; never per site, but NOT covered by ε (the "
              "sum, a federation-wide mean, is released without noise); no data drift",
}


def released_keys(eval_release: str) -> frozenset[str]:
    """Every reply key the statement accounts for under a site's ``eval_release``."""
    keys = {k for r in RELEASES for k in r.keys}
    if eval_release in ("plain", "noised"):
        keys |= set(EVAL_KEYS)
    if eval_release != "nothing":
        keys |= set(SECURE_EVAL_KEYS)
    return frozenset(keys)


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
    trained = [e for e in ledger.entries if e.kind == "train"]
    last = trained[-1] if trained else None
    eps = ledger.epsilon()
    release = ledger.policy.get("eval_release", {}).get("value", "unknown")
    return {
        "site": ledger.site,
        "unit": ledger.unit,
        "policy": ledger.policy,
        "releases": [r.line() for r in RELEASES]
        + [EVAL_RELEASE.get(release, f"evaluation: policy {release!r} (not recorded)")],
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
        "level": "unit",
        "units": sorted({r["unit"] for r in rows}),
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
             f"Federation unit-level ε = **{payload['max_epsilon']:.3f}** (max over sites; "
             f"units: {', '.join(payload['units'])}).",
             "", *site_table(payload["sites"]), "",
             "| site | accountant | budget | left | rounds |", "|---|---|---|---|---|"]
    lines += [f"| {r['site']} | {r['accountant']} | {r['target_epsilon']} | "
              f"{r['budget_left']:.3f} | {r['rounds']} |" for r in rows]
    for r in rows:
        lines += ["", f"## Site {r['site']}: what it releases", ""]
        lines += [f"- {item}" for item in r["releases"]]
        if r["policy"]:
            lines += ["", "| policy | value | set by |", "|---|---|---|"]
            lines += [f"| {k} | {v['value']} | {v['set_by']} |" for k, v in r["policy"].items()]
    lines += ["", "![ε per round](privacy_epsilon.png)", ""]
    (out_dir / "privacy_report.md").write_text("\n".join(lines))
    return payload
