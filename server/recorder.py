"""Everything a run writes: manifest, per-round metrics, adapter versions, summary, report.

A run folder is finished only when ``summary.json`` exists; it is written last. A run that
fails leaves ``error.txt`` instead, so nobody mistakes it for a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from fedcpt.config import RunConfig
from fedcpt.core.data import expand_source
from fedcpt.core.evaluation import EvalResult, paired_standard_error
from fedcpt.core.model import AdaptedModel
from fedcpt.exceptions import DataError, FedcptError
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.params import MODULUS, SecAggParams
from fedcpt.privacy.user_level import user_level_epsilon
from fedcpt.server.continual import continual_metrics
from fedcpt.server.report import write_report
from fedcpt.strategies.base import SiteEvalReport, SiteTrainReport
from fedcpt.strategies.stateful import StatefulStep

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
PACKAGES = ("fedcpt", "torch", "transformers", "peft", "flwr", "opacus", "ray")


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def data_hashes(sources: tuple[str, ...]) -> dict[str, str]:
    """SHA-256 of every file a list of sources reads (built-in sources are named as is)."""
    hashes: dict[str, str] = {}
    for spec in sources:
        if spec.startswith(("stdlib:", "hf:")):
            hashes[spec] = f"builtin:{platform.python_version()}" if spec.startswith(
                "stdlib:") else "remote"
            continue
        try:
            paths = expand_source(spec)
        except DataError:  # a deployed site's data exists only at the site
            hashes[spec] = "not available to the server"
            continue
        for path in paths:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def secagg_summary(cfg: RunConfig) -> dict[str, Any]:
    """Whether the server saw only sums, and the SecAgg+ parameters of a full round."""
    if not cfg.secagg.enabled:
        return {"enabled": False}
    params = SecAggParams.for_round(cfg, cfg.sites_per_round)
    return {"enabled": True, "protocol": "SecAgg+ (Bell et al. 2020)", **asdict(params),
            "modulus": MODULUS}


def distributed_dp_summary(cfg: RunConfig, rounds: int, adapter_size: int) -> dict[str, Any]:
    """Site-level (ε, δ) of the noise the sites added under SecAgg, for a full round."""
    params = SecAggParams.for_round(cfg, cfg.sites_per_round)
    ddp = DistributedDP.for_config(cfg, params.threshold, cfg.sites_per_round, adapter_size)
    return {"epsilon": ddp.epsilon(rounds, cfg.privacy.user_delta),
            "delta": cfg.privacy.user_delta,
            "noise_multiplier": cfg.privacy.user_noise_multiplier,
            "clipping_norm": cfg.privacy.user_clipping_norm, "rounds": rounds,
            "mechanism": "distributed discrete Gaussian (Kairouz et al. 2021), added by the "
                         f"sites; counts only {ddp.honest} honest survivors",
            "accountant": "rdp (DDG, no sampling amplification)"}


def privacy_summary(cfg: RunConfig, latest: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-site record-level (ε, δ) as the sites last reported them, and the federation's."""
    sites = {
        site: {
            "epsilon": p["epsilon"],
            "epsilon_rdp": p["epsilon-rdp"],
            "delta": p["delta"],
            "steps": int(p["dp-steps"]),
            "noise_multiplier": p["noise-multiplier"],
            "sample_rate": p["sample-rate"],
        }
        for site, p in sorted(latest.items())
    }
    return {
        "sites": sites,
        "max_epsilon": max((v["epsilon"] for v in sites.values()), default=0.0),
        "max_delta": max((v["delta"] for v in sites.values()), default=0.0),
        "accountant": cfg.privacy.accountant,
        "target_epsilon": cfg.privacy.target_epsilon,
        "level": "record",
        "ledger_dir": cfg.privacy.ledger_dir,
    }


def _encode_random(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_random(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _weighted_mean(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


class RunRecorder:
    """Collects per-site and global results round by round and writes the run folder."""

    def __init__(self, run_dir: Path, cfg: RunConfig, run_id: str) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.run_id = run_id
        self.started = time.time()
        self.rows: list[dict[str, Any]] = []
        self.general: dict[int, EvalResult] = {}
        self.domain_base: dict[str, float] = {}
        self._train: dict[int, tuple[list[SiteTrainReport], list[str], bool]] = {}
        self._eval: dict[int, list[SiteEvalReport]] = {}
        self.full_model_bytes = 0
        self.adapter_size = 0  # adapter coordinates (distributed DP's accounting needs them)
        self.privacy: dict[str, dict[str, float]] = {}
        self._steps: dict[int, dict[str, dict[str, Any]]] = {}
        self.stateful: list[StatefulStep] = []
        """Server steps whose state is saved with every version (before the checkpoint)."""

    def start(self, lm: AdaptedModel) -> None:
        """Create the folder and write the manifest (config, versions, data hashes, seed)."""
        (self.run_dir / "adapters").mkdir(parents=True, exist_ok=True)
        self.full_model_bytes = lm.base_param_bytes
        data = {site.name: data_hashes(site.data) for site in self.cfg.sites}
        data["general"] = data_hashes(self.cfg.data.general)
        write_json(self.run_dir / "manifest.json", {
            "run_id": self.run_id,
            "config": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "versions": package_versions(),
            "data_files": data,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
        })
        (self.run_dir / "metrics.jsonl").write_text("", encoding="utf-8")

    # --- RoundListener -------------------------------------------------------------
    def on_train(self, server_round: int, reports: list[SiteTrainReport],
                 failures: list[str], aggregated: bool) -> None:
        self._train[server_round] = (reports, failures, aggregated)
        for r in reports:
            if r.privacy:
                self.privacy[r.site] = r.privacy
            loss = "n/a (DP)" if r.train_loss is None else f"{r.train_loss:.4f}"
            norm = "masked" if r.update_norm is None else f"{r.update_norm:.3f}"
            log.info("round %d · site %-12s train loss %s · %d examples · %.1fs · "
                     "update norm %s", server_round, r.site, loss, r.num_examples,
                     r.seconds, norm)

    def on_evaluate(self, server_round: int, reports: list[SiteEvalReport]) -> None:
        self._eval[server_round] = reports
        for r in reports:
            self.domain_base.setdefault(r.site, r.base_loss)
            log.info("round %d · site %-12s domain loss %.4f (base %.4f)", server_round,
                     r.site, r.loss, r.base_loss)

    def on_server_steps(self, server_round: int, details: dict[str, dict[str, Any]]) -> None:
        self._steps[server_round] = details

    # --- checkpoint: everything needed to resume after the last finished round ---------
    def _checkpoint(self, server_round: int) -> None:
        """Persist the recorder's state and the sampling RNG after a finished round."""
        write_json(self.run_dir / CHECKPOINT, {
            "last_round": server_round,
            "phase": self.cfg.phase_of(server_round).index,
            "elapsed_s": time.time() - self.started,
            "full_model_bytes": self.full_model_bytes,
            # the summary needs only the base and the latest evaluation
            "general": {r: asdict(self.general[r]) for r in {0, server_round}},
            "domain_base": self.domain_base,
            "train": {r: {"reports": [asdict(x) for x in reports], "failures": failures,
                          "aggregated": ok} for r, (reports, failures, ok) in self._train.items()},
            "eval": {r: [asdict(x) for x in reports] for r, reports in self._eval.items()},
            "privacy": self.privacy,
            "steps": self._steps,
            "random_state": _encode_random(random.getstate()),
        })

    @classmethod
    def resume(cls, run_dir: Path, cfg: RunConfig) -> tuple[RunRecorder, int]:
        """The recorder of an interrupted run, and the last round it finished.

        Restores the sampling RNG and drops metrics lines past the checkpoint (a round
        that died half-way is run again)."""
        manifest = json.loads((run_dir / "manifest.json").read_text())
        state = json.loads((run_dir / CHECKPOINT).read_text())
        recorder = cls(run_dir, cfg, manifest["run_id"])
        last = int(state["last_round"])
        recorder.started = time.time() - state["elapsed_s"]
        recorder.full_model_bytes = state["full_model_bytes"]
        recorder.general = {int(r): EvalResult(**e) for r, e in state["general"].items()}
        recorder.domain_base = state["domain_base"]
        recorder._train = {int(r): ([SiteTrainReport(**x) for x in t["reports"]],
                                    t["failures"], t["aggregated"])
                           for r, t in state["train"].items()}
        recorder._eval = {int(r): [SiteEvalReport(**x) for x in v]
                          for r, v in state["eval"].items()}
        recorder.privacy = state["privacy"]
        recorder._steps = {int(r): v for r, v in state["steps"].items()}
        recorder.rows = []
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill: past the checkpoint
                continue
            if row["round"] <= last:
                recorder.rows.append(row)
        tmp = run_dir / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recorder.rows), encoding="utf-8")
        os.replace(tmp, run_dir / "metrics.jsonl")
        (run_dir / "error.txt").unlink(missing_ok=True)
        random.setstate(_decode_random(state["random_state"]))
        log.info("resuming %s after round %d of %d (phase %d)", run_dir, last,
                 cfg.federation.rounds, state.get("phase", 0) + 1)
        return recorder, last

    # --- global model, once per round after aggregation ------------------------------
    def on_global(self, server_round: int, general: EvalResult, lm: AdaptedModel) -> None:
        """Save the global adapter version and append the round's metrics line."""
        self.general[server_round] = general
        version = self.run_dir / "adapters" / f"round-{server_round:03d}"
        lm.model.save_pretrained(str(version))
        train, failures, aggregated = self._train.get(server_round, ([], [], False))
        evals = self._eval.get(server_round, [])
        row = {
            "round": server_round,
            "phase": self.cfg.phase_of(server_round).name,
            "general_loss": general.loss,
            "general_perplexity": general.perplexity,
            "general_ece": general.ece,
            "domain_loss": _weighted_mean([(r.loss, r.tokens) for r in evals]),
            "domain_per_site": {r.site: r.loss for r in evals},
            "domain_ece": _weighted_mean([(r.ece, r.tokens) for r in evals]),
            "aggregated": aggregated,
            "sites_trained": [r.site for r in train],
            "train_loss": _weighted_mean([(r.train_loss, r.num_examples) for r in train
                                          if r.train_loss is not None]),
            "update_norm_per_site": {r.site: r.update_norm for r in train
                                     if r.update_norm is not None},
            "bytes_up_per_client": (sum(r.bytes_up for r in train) // len(train)
                                    if train else 0),
            "failures": failures,
            "server_steps": self._steps.get(server_round, {}),
            "elapsed_s": time.time() - self.started,
        }
        self.rows.append(row)
        write_json(version / "version.json", self._provenance(server_round, row))
        for step in self.stateful:
            step.save_state(version)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        self._checkpoint(server_round)
        domain = "n/a" if row["domain_loss"] is None else f"{row['domain_loss']:.4f}"
        log.info("round %d · global: general loss %.4f · domain loss %s · %.0fs elapsed",
                 server_round, general.loss, domain, row["elapsed_s"])

    def _provenance(self, server_round: int, row: dict[str, Any]) -> dict[str, Any]:
        """Where a version came from: parent, sites, their data, config — never data."""
        manifest = json.loads((self.run_dir / "manifest.json").read_text())
        initial = self.cfg.federation.initial_adapter or "fresh adapter"
        return {
            "round": server_round,
            "parent": f"round-{server_round - 1:03d}" if server_round else initial,
            "run_id": self.run_id,
            "sites": row["sites_trained"] if row["aggregated"] else [],
            "data_files": {s: manifest["data_files"].get(s, {}) for s in row["sites_trained"]
                           if row["aggregated"]},
            "config_sha256": hashlib.sha256(self.cfg.to_json().encode()).hexdigest(),
            "metrics": {k: row[k] for k in ("general_loss", "domain_loss", "domain_per_site")},
            "server_steps": row["server_steps"],
        }

    def finish(self) -> dict[str, Any]:
        """Write summary.json and report.md; return the summary.

        Raises FedcptError if no round was aggregated: such a run has no result."""
        last = max(self.general)
        aggregated = sum(1 for _, _, ok in self._train.values() if ok)
        if aggregated == 0:
            first = next((f for _, fs, _ in self._train.values() for f in fs), "no replies")
            raise FedcptError(f"no round was aggregated (first failure: {first})")
        with_evals = [r for r, reports in self._eval.items() if reports]
        final_evals = self._eval[max(with_evals)] if with_evals else []
        per_site = {r.site: {"base": r.base_loss, "final": r.loss} for r in final_evals}
        domain_base = _weighted_mean([(r.base_loss, r.tokens) for r in final_evals])
        domain_final = _weighted_mean([(r.loss, r.tokens) for r in final_evals])
        base, final = self.general[0], self.general[last]
        uploads = [r["bytes_up_per_client"] for r in self.rows if r["bytes_up_per_client"]]
        bytes_up = max(uploads) if uploads else 0
        summary = {
            "name": self.cfg.name,
            "model": self.cfg.model.name,
            "num_sites": len(self.cfg.sites),
            "rounds": last,
            "rounds_aggregated": aggregated,
            "general_loss": {"base": base.loss, "final": final.loss},
            "domain_loss": {"base": domain_base, "final": domain_final, "per_site": per_site},
            "forgetting": final.loss - base.loss,
            "forgetting_standard_error": paired_standard_error(base.block_losses,
                                                               final.block_losses),
            "adaptation": (domain_base - domain_final) if final_evals else None,
            "general_ece": {"base": base.ece, "final": final.ece},
            "eval_tokens": {"general": final.tokens,
                            "domain_per_site": final_evals[0].tokens if final_evals else 0},
            "bytes_up_per_client_round": bytes_up,
            "full_model_bytes": self.full_model_bytes,
            "upload_fraction": bytes_up / self.full_model_bytes if self.full_model_bytes else None,
            "failures": sum(len(f) for _, f, _ in self._train.values()),
            "wall_time_s": time.time() - self.started,
        }
        if self.cfg.phases:
            summary["continual"] = continual_metrics(
                self.cfg, self._eval, {r["round"]: r["general_loss"] for r in self.rows})
        summary["secagg"] = secagg_summary(self.cfg)
        if self.cfg.privacy.enabled:
            summary["privacy"] = privacy_summary(self.cfg, self.privacy)
        if self.cfg.privacy.user_level and self.cfg.secagg.enabled:
            summary["privacy_user_level"] = distributed_dp_summary(self.cfg, last,
                                                                   self.adapter_size)
        elif self.cfg.privacy.user_level:
            summary["privacy_user_level"] = {
                "epsilon": user_level_epsilon(self.cfg.privacy, last),
                "delta": self.cfg.privacy.user_delta,
                "noise_multiplier": self.cfg.privacy.user_noise_multiplier,
                "clipping_norm": self.cfg.privacy.user_clipping_norm,
                "rounds": last,
                "accountant": "rdp (no sampling amplification)",
            }
        write_report(self.run_dir, summary, self.rows, self.domain_base, self.cfg)
        write_json(self.run_dir / "summary.json", summary)
        log.info("run finished: forgetting %+.4f nats, adaptation %+.4f nats; report: %s",
                 summary["forgetting"], summary["adaptation"] or float("nan"),
                 self.run_dir / "report.md")
        return summary

    def fail(self, error: BaseException) -> None:
        """Mark the folder as a failed run (no summary.json is written)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "error.txt").write_text(f"{type(error).__name__}: {error}\n",
                                                encoding="utf-8")

