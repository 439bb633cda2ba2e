"""The run's :class:`~fedcpt.runfolder.records.Summary`, built from what its rounds recorded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fedcpt.config import RunConfig
from fedcpt.core.evaluation import paired_standard_error
from fedcpt.core.retention import retention_summary
from fedcpt.exceptions import FedcptError
from fedcpt.runfolder.records import RoundRecord, Summary, weighted_mean
from fedcpt.server.checkpoint import RunState
from fedcpt.server.continual import continual_metrics
from fedcpt.server.reports.site_ledgers import (
    FROM_LEDGERS,
    HELD,
    HELD_BY_SITES,
    sites_epsilon,
)


def privacy_summary(cfg: RunConfig, state: RunState) -> dict[str, Any]:
    """Per-site unit-level (ε, δ) where the server may read it (:mod:`.site_ledgers`: a
    simulated site's own ledger file; a deployed site holds its own), and the federation's
    maximum — None while any site that trained holds its ε (a maximum over the others
    would under-report it)."""
    trained = {r.site for t in state.train.values() for r in t.reports}
    read, unreadable = sites_epsilon(cfg, sorted(trained | {s.name for s in cfg.sites}),
                                     state.run_id)
    held = {site: why for site, why in unreadable.items() if site in trained or why != HELD}
    complete = bool(read) and not held
    return {
        "epsilon_source": FROM_LEDGERS if read else HELD_BY_SITES,
        "sites": read,
        "held_by_sites": held,
        "max_epsilon": max(v["epsilon"] for v in read.values()) if complete else None,
        "max_delta": max(v["delta"] for v in read.values()) if complete else None,
        "accountant": cfg.privacy.accountant,
        "target_epsilon": cfg.privacy.target_epsilon,
        "level": "unit",
        "ledger_dir": cfg.privacy.ledger_dir,
    }


def build_summary(cfg: RunConfig, state: RunState, rows: list[RoundRecord],
                  mechanism: Callable[[RunConfig, int, int], dict[str, Any]]) -> Summary:
    """The summary of a run; FedcptError if no round was aggregated (no result).
    ``mechanism(cfg, rounds, bytes_up)`` gives the fields the round protocol fills
    (:meth:`~fedcpt.server.protocols.base.RoundProtocol.summary`)."""
    last = max(state.general)
    aggregated = sum(1 for t in state.train.values() if t.aggregated)
    if aggregated == 0:
        first = next((f for t in state.train.values() for f in t.failures), "no replies")
        raise FedcptError(f"no round was aggregated (first failure: {first})")
    with_evals = [r for r, reports in state.evals.items() if reports]
    final_evals = state.evals[max(with_evals)] if with_evals else []
    per_site = {r.site: {"base": r.base_loss, "final": r.loss} for r in final_evals
                if not r.summed_sites}
    domain_base = weighted_mean([(r.base_loss, r.tokens) for r in final_evals])
    domain_final = weighted_mean([(r.loss, r.tokens) for r in final_evals])
    singles = [r for r in final_evals if not r.summed_sites]
    domain_loss: dict[str, Any] = {"base": domain_base, "final": domain_final,
                                   "per_site": per_site}
    for r in final_evals:
        if r.summed_sites:  # no per-site value exists: the sum is shown as such
            domain_loss["secure_sum"] = {"sites": r.summed_sites, "tokens": r.tokens,
                                         "base": r.base_loss, "final": r.loss}
    base_report, final_report = state.general[0], state.general[last]
    base, final = base_report.overall, final_report.overall
    kinds = cfg.data.general_kinds()
    in_pool = tuple(k.name for k in kinds if k.rehearsal_share > 0)
    uploads = [r.bytes_up_per_client for r in rows if r.bytes_up_per_client]
    bytes_up = max(uploads) if uploads else 0
    return Summary(
        name=cfg.name,
        model=cfg.model.name,
        num_sites=len(cfg.sites),
        rounds=last,
        rounds_aggregated=aggregated,
        general_loss={"base": base.loss, "final": final.loss},
        domain_loss=domain_loss,
        forgetting=final.loss - base.loss,
        forgetting_standard_error=paired_standard_error(base.block_losses,
                                                        final.block_losses),
        adaptation=(domain_base - domain_final) if final_evals else None,
        general_ece={"base": base.ece, "final": final.ece},
        eval_tokens={"general": final.tokens,
                     "domain_per_site": singles[0].tokens if singles else 0},
        bytes_up_per_client_round=bytes_up,
        full_model_bytes=state.full_model_bytes,
        upload_fraction=bytes_up / state.full_model_bytes if state.full_model_bytes else None,
        failures=sum(len(t.failures) for t in state.train.values()),
        wall_time_s=time.time() - state.started,
        general_kinds={k.name: {"sources": list(k.sources), "rehearsal_share": k.rehearsal_share,
                                "in_pool": k.rehearsal_share > 0} for k in kinds},
        retention=retention_summary(base_report, final_report, in_pool).to_dict(),
        continual=(continual_metrics(cfg, state.evals, {r.round: r.general_loss for r in rows})
                   if cfg.phases else None),
        privacy=privacy_summary(cfg, state) if cfg.privacy.enabled else None,
        **mechanism(cfg, last, bytes_up),
    )
