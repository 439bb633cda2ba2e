"""The sites' ε where the server may read it.

No reply carries a site's accounting: ε, δ, σ and q all depend on its number of training
units N (q = batch / N), which is the site's private information
(:mod:`fedcpt.privacy.gate`). A deployed site's ε is held by the site: its ledger, and
``fedcpt privacy report`` run there. In a simulation the sites' ledger files lie on the
same disk as the run folder, so the run summary reads each simulated site's ε from its own
ledger file (the file a site admin would hand to a privacy board) and says so. A ledger
counts only if it records this run: a file from another run or federation is not read as
this run's site's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedcpt.config import RunConfig
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import LedgerError, PrivacyLedger
from fedcpt.privacy.plan import EVAL_RUN_SUFFIX
from fedcpt.privacy.policy import site_policy
from fedcpt.privacy.report import site_row

log = logging.getLogger(__name__)

FROM_LEDGERS = ("read from the sites' own ledger files (simulation): no reply carries ε, "
                "which depends on a site's number of training units")
HELD_BY_SITES = ("held by the sites: no reply carries ε (it depends on a site's number of "
                 "training units); each site reports its own with `fedcpt privacy report`")
HELD = "held by the site"  # a site without a ledger file the server can read
SUMMARY_KEYS = ("unit", "epsilon", "epsilon_rdp", "delta", "steps", "noise_multiplier",
                "sample_rate", "target_epsilon")


def simulated_ledger_path(cfg: RunConfig, site: str) -> Path | None:
    """Where simulated site ``site`` keeps its ledger (None: not a simulated site of
    ``cfg``, or it keeps none)."""
    config = next((s for s in cfg.sites if s.name == site), None)
    if config is None:
        return None
    path = site_policy(cfg, config, {}, deployed=False).ledger_path
    return Path(path).expanduser() if path else None


def run_ledger(cfg: RunConfig, site: str, run_id: str) -> PrivacyLedger | None:
    """Site ``site``'s ledger as this run's server can read it: a simulated site's own
    file, if it records run ``run_id``, at the run's δ; else None (held by the site).
    LedgerError if the file is there but corrupt or another site's."""
    path = simulated_ledger_path(cfg, site)
    if path is None or not path.is_file():
        return None
    ledger = PrivacyLedger.load(path)
    if ledger.site != site:
        raise LedgerError(f"{path} is the ledger of site {ledger.site!r}, not {site!r}")
    if not any(e.run in (run_id, run_id + EVAL_RUN_SUFFIX) for e in ledger.entries):
        return None
    ledger.accountant = cfg.privacy.accountant
    ledger.for_run(cfg.privacy.target_delta or None)  # as the site reports this run
    return ledger


def epsilon_by_round(ledger: PrivacyLedger, run_id: str) -> list[tuple[int, float]]:
    """(round, the site's cumulative ε after it) for each round of ``run_id`` it paid."""
    history = ledger.history
    return [(e.round, epsilon(history[: i + 1], ledger.delta, ledger.accountant))
            for i, e in enumerate(ledger.entries) if e.run == run_id and e.kind == "train"]


def sites_epsilon(cfg: RunConfig, sites: list[str], run_id: str,
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """For each of ``sites``: its ε and accounting read from its ledger, or why the server
    holds none (held by the site, or its ledger file is unreadable)."""
    read: dict[str, dict[str, Any]] = {}
    held: dict[str, str] = {}
    for site in sorted(set(sites)):
        try:
            ledger = run_ledger(cfg, site, run_id)
        except LedgerError as err:
            log.error("site %s: its ledger cannot be read: %s", site, err)
            held[site] = f"its ledger file cannot be read: {err}"
            continue
        if ledger is None:
            held[site] = HELD
            continue
        row = site_row(ledger)
        read[site] = {**{k: row[k] for k in SUMMARY_KEYS}, "ledger": str(ledger.path),
                      "epsilon_by_round": epsilon_by_round(ledger, run_id)}
    return read, held
