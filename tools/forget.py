"""Withdrawing a site from a run (``fedcpt adapters forget RUN SITE``): plan the replay
without it, then certify the replacement version.

The exact way to remove a site's influence is to retrain without it from the last version
it did not touch. Nothing stored can shorten that replay: the server never keeps a
site's update (under SecAgg it never even sees one, only their sum), and every update
after the site's first round was trained from a global adapter that already carried the
site. So the remaining sites retrain every round from the site's first contribution on;
under DP each replayed round is a new spend in their ledgers (the replay's config names
the run's ledger folder), and the certificate states their ε before and after.

:func:`plan_forget` checks the request and builds the replay's config (it changes
nothing); the caller runs it (``simulations.runner.simulate`` in simulation, ``flwr run``
with the same config in a deployment); :func:`certify` then writes
``removal-certificate.json`` into the replay's folder and returns it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcpt.config import PhaseConfig, RunConfig
from fedcpt.core.durable import write_json
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.versions import list_versions, run_config, version_dir

log = logging.getLogger(__name__)

CERTIFICATE = "removal-certificate.json"


@dataclass(frozen=True)
class ForgetPlan:
    """What withdrawing ``site`` from ``run_dir`` takes."""

    run_dir: Path
    site: str
    start: int
    """The last version the site did not contribute to; the replay starts from it."""
    affected: list[int]
    """Versions that carry the site's influence (every version from its first round on)."""
    config: RunConfig | None
    """The replay's config (None: the site never contributed, nothing to replay)."""
    caveats: list[str]
    """Why the replay may differ from a federation that never had the site (empty:
    it is that federation, same config and seed). Either way no version of the replay
    has seen the site's data."""


def plan_forget(run_dir: Path, site: str) -> ForgetPlan:
    """The replay that removes ``site`` from the run in ``run_dir``; ConfigError for an
    unknown site or a run without stored versions (nothing is written)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    names = [s.name for s in cfg.sites]
    if site not in names:
        close = difflib.get_close_matches(site, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"site {site!r} is not in run {run_dir} (sites: "
                          f"{', '.join(names)}){hint}")
    versions = list_versions(run_dir)
    if not versions:
        raise ConfigError(f"{run_dir} has no stored adapter versions: there is nothing to "
                          "forget from")
    rounds = [v["round"] for v in versions]
    if rounds != list(range(len(rounds))):
        raise ConfigError(f"{run_dir} is missing adapter versions (found {rounds}); a "
                          "replay needs every version up to the last")
    touched = [v["round"] for v in versions if site in v["sites"]]
    if not touched:
        return ForgetPlan(run_dir, site, rounds[-1], [], None, [])
    start = touched[0] - 1
    affected = rounds[touched[0]:]
    replay, caveats = _replay_config(cfg, run_dir, site, start, rounds[-1])
    return ForgetPlan(run_dir, site, start, affected, replay, caveats)


def _replay_config(cfg: RunConfig, run_dir: Path, site: str, start: int,
                   last: int) -> tuple[RunConfig, list[str]]:
    """The run's config without ``site``, for rounds ``start + 1 … last``."""
    caveats: list[str] = []
    sites = tuple(s for s in cfg.sites if s.name != site)
    federation = dataclasses.replace(cfg.federation, rounds=last - start)
    if cfg.federation.sites_per_round > len(sites):
        federation = dataclasses.replace(federation, sites_per_round=len(sites))
        caveats.append(f"sites_per_round lowered to the {len(sites)} remaining sites")
    if start:
        federation = dataclasses.replace(
            federation, initial_adapter=str(version_dir(run_dir, start)))
        caveats += _restart_caveats(cfg, start)
    elif cfg.federation.initial_adapter:
        caveats.append(f"the run started from {cfg.federation.initial_adapter}; forget the "
                       "site from that adapter's own run too if it trained there")
    phases = []
    for ph in cfg.phase_plan() if cfg.phases else []:
        first, rounds = max(ph.first_round, start + 1), min(ph.last_round, last)
        if rounds < first:
            continue
        kept = tuple(s for s in ph.sites if s != site)
        if not kept:
            raise ConfigError(f"phase {ph.name!r} trained only on site {site!r}: without it "
                              "the phase has no sites to replay")
        phases.append(PhaseConfig(name=ph.name, rounds=rounds - first + 1, sites=kept))
    replay = dataclasses.replace(cfg, name=f"{cfg.name}-without-{site}", sites=sites,
                                 federation=federation, phases=tuple(phases))
    return replay, caveats


def _restart_caveats(cfg: RunConfig, start: int) -> list[str]:
    """What a replay from version ``start`` (> 0) does not carry over from the run."""
    out = ["local batch order is seeded per (site, round) and the replay numbers its "
           f"rounds from 1, not {start + 1}",
           "site sampling restarts from the seed" if cfg.federation.sites_per_round else ""]
    phase = cfg.phase_of(start + 1)
    if cfg.lr_at(start + 1) != cfg.train.lr_at(1, phase.rounds) or (
            cfg.train.schedule != "constant" or cfg.train.warmup_rounds):
        out.append("the learning-rate schedule restarts at the replay's first round")
    if cfg.strategy.server_optimizer != "none" or cfg.strategy.regression_guard:
        out.append("server-step state (optimiser moments, guard reference) restarts")
    return [c for c in out if c]


def certify(plan: ForgetPlan, replay_dir: Path | None) -> dict[str, Any]:
    """The removal certificate; written to ``replay_dir`` when there was a replay.

    Raises RuntimeError (a bug, not user input) if the withdrawn site appears in any
    version of the replay."""
    original = list_versions(plan.run_dir)
    if plan.config is None or replay_dir is None:
        cert = _certificate(plan, original[-1], plan.run_dir, original[-1]["round"], [])
        log.warning("site %s never contributed to %s; the latest version stands",
                    plan.site, plan.run_dir)
        return cert
    replay = list_versions(replay_dir)
    leaked = [v["round"] for v in replay if plan.site in v["sites"]]
    if leaked:
        raise RuntimeError(f"the replay trained on withdrawn site {plan.site} in {leaked}")
    last = replay[-1]
    cert = _certificate(plan, last, replay_dir, last["round"], replay)
    write_json(Path(replay_dir) / CERTIFICATE, cert)
    _append_to_report(RunFolder(replay_dir), cert)
    return cert


def _certificate(plan: ForgetPlan, last: dict[str, Any], folder: Path, last_round: int,
                 replay: list[dict[str, Any]]) -> dict[str, Any]:
    adapter = version_dir(folder, last_round) / "adapter_model.safetensors"
    remaining: dict[str, dict[str, str]] = {}
    for v in list_versions(plan.run_dir)[:plan.start + 1] + replay[1:]:
        for site, files in v.get("data_files", {}).items():
            remaining.setdefault(site, {}).update(files)
    return {
        "run": str(plan.run_dir),
        "run_id": json.loads(RunFolder(plan.run_dir).manifest.read_text())["run_id"],
        "withdrawn_site": plan.site,
        "versions_affected": plan.affected,
        "replayed_from": plan.start,
        "replacement": {"run": str(folder), "round": last_round,
                        "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest()},
        "replayed_rounds": len(plan.affected),
        "reused_updates": 0,
        "influence_removed": True,
        "equals_never_joined": not plan.caveats,
        "caveats": plan.caveats,
        "fingerprints_remaining": remaining,
        "privacy": _privacy_cost(plan.run_dir, folder) if plan.affected else None,
    }


def _privacy_cost(run_dir: Path, replay_dir: Path) -> dict[str, Any] | None:
    """Per remaining site: ε before the replay and after it (None without DP)."""
    def sites(folder: Path) -> dict[str, dict[str, Any]]:
        path = RunFolder(folder).summary
        summary = json.loads(path.read_text()) if path.is_file() else {}
        return (summary.get("privacy") or {}).get("sites", {})

    before, after = sites(run_dir), sites(replay_dir)
    if not after:
        return None
    return {s: {"epsilon_before": before.get(s, {}).get("epsilon"),
                "epsilon_after": r["epsilon"]} for s, r in after.items()}


def certificate_line(cert: dict[str, Any]) -> str:
    """The certificate in one readable line."""
    affected = cert["versions_affected"]
    if not affected:
        return (f"site {cert['withdrawn_site']} never contributed to {cert['run']}: no "
                f"version affected; round {cert['replacement']['round']} stands")
    rep = cert["replacement"]
    eps = cert["privacy"]
    spend = ("; ε " + ", ".join(f"{s} {v['epsilon_before']:.3f}→{v['epsilon_after']:.3f}"
                                for s, v in eps.items() if v["epsilon_before"] is not None)
             if eps else "")
    match = ("equals the never-joined run" if cert["equals_never_joined"] else
             "differs from the never-joined run: " + "; ".join(cert["caveats"]))
    return (f"site {cert['withdrawn_site']} removed: versions {affected[0]}–{affected[-1]} "
            f"of {cert['run']} are replaced by {rep['run']} round {rep['round']} "
            f"(sha256 {rep['adapter_sha256'][:12]}), retrained by "
            f"{', '.join(sorted(cert['fingerprints_remaining']))} for "
            f"{cert['replayed_rounds']} rounds{spend}; "
            f"{match}")


def _append_to_report(folder: RunFolder, cert: dict[str, Any]) -> None:
    if folder.report.is_file():
        with open(folder.report, "a", encoding="utf-8") as fh:
            fh.write(f"\n## Removal certificate\n\n{certificate_line(cert)} "
                     f"(`{CERTIFICATE}`).\n")
