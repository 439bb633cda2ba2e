"""Experiment tracking: observers the :class:`~fedcpt.server.recorder.RunRecorder` tells
about the run (started, a round recorded, finished or failed), which mirror it into the
trackers users already run (MLflow, TensorBoard).

The run folder stays the record; a tracker is a copy. With ``[tracking]`` off,
:func:`tracking_observers` returns none and no tracker module is imported. A tracker that
fails mid-run is dropped with an error in the log, and the run goes on: losing a mirror
must not lose a federated round.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from fedcpt.config import RunConfig
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import RoundRecord, Summary

log = logging.getLogger(__name__)

# backend -> (the package it needs, the module of its observer, the observer's class)
BACKENDS = {
    "mlflow": ("mlflow", "fedcpt.server.reports.tracking_mlflow", "MlflowObserver"),
    "tensorboard": ("tensorboard", "fedcpt.server.reports.tracking_tensorboard",
                    "TensorBoardObserver"),
}


class RunObserver(Protocol):
    """What the recorder tells a tracker, in this order: started, rounds, then finished
    or failed."""

    def run_started(self, run_id: str) -> None: ...

    def round_recorded(self, record: RoundRecord) -> None: ...

    def run_finished(self, summary: Summary, final_version: Path | None) -> None: ...

    def run_failed(self, error: BaseException) -> None: ...


def tracking_observers(cfg: RunConfig, folder: RunFolder) -> list[RunObserver]:
    """One observer per configured backend (none, importing nothing, when tracking is
    off); ConfigError naming the extra when a backend's package is missing."""
    observers = []
    for backend in cfg.tracking.backends:
        package, module, name = BACKENDS[backend]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"tracking.backends names {backend!r}, but {package} is not "
                              "installed: pip install 'fedcpt[tracking]'")
        observer_cls = getattr(importlib.import_module(module), name)
        observers.append(observer_cls(cfg, folder))
    return observers


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """A round's numbers under tracker names: the global metrics, ``general_loss/<kind>``,
    ``domain_loss/<site>``, ``epsilon/<site>``, ``data_drift/<site>``,
    ``update_norm/<site>`` and the drift monitor's ``drift/*`` signals. Absent values
    (e.g. the train loss under DP) are left out."""
    r = record
    values: dict[str, float | None] = {
        "general_loss": r.general_loss, "general_perplexity": r.general_perplexity,
        "general_ece": r.general_ece, "general_kl_to_base": r.general_kl_to_base,
        "answer_loss": r.answer_loss, "answer_exact_match": r.answer_exact_match,
        "domain_loss": r.domain_loss, "domain_ece": r.domain_ece, "train_loss": r.train_loss,
        "update_norm": r.update_norm, "bytes_up_per_client": r.bytes_up_per_client,
        "elapsed_s": r.elapsed_s, "aggregated": float(r.aggregated),
        "sites_trained": len(r.sites_trained), "failures": len(r.failures),
        "data_drift_flags": len(r.data_drift_flags),
    }
    for prefix, per in (("general_loss", r.general_per_kind), ("domain_loss", r.domain_per_site),
                        ("data_drift", r.data_drift_per_site),
                        ("update_norm", r.update_norm_per_site)):
        values.update({f"{prefix}/{metric_name(key)}": v for key, v in per.items()})
    if r.drift:
        values["drift/update_ratio"] = r.drift.get("update_ratio")
        values["drift/general_loss_rise"] = r.drift.get("general_loss_rise")
        values["drift/flags"] = len(r.drift.get("flags", []))
        values["drift/rolled_back"] = float(r.drift.get("rolled_back_to") is not None)
    if r.domain_secure:
        for key in ("loss", "base_loss", "ece", "tokens", "clipped"):
            values[f"domain_secure/{key}"] = r.domain_secure.get(key)
    return {k: float(v) for k, v in values.items() if _is_number(v)}


def summary_metrics(summary: Summary) -> dict[str, float]:
    """The run's result under ``summary/*`` names."""
    values = {"summary/forgetting": summary.forgetting,
              "summary/adaptation": summary.adaptation,
              "summary/general_loss_final": summary.general_loss.get("final"),
              "summary/domain_loss_final": summary.domain_loss.get("final"),
              "summary/rounds_aggregated": summary.rounds_aggregated,
              "summary/bytes_up_per_client_round": summary.bytes_up_per_client_round,
              "summary/wall_time_s": summary.wall_time_s}
    if summary.privacy:  # read from the sites' ledgers (simulation), never from replies
        values["summary/max_epsilon"] = summary.privacy.get("max_epsilon")
        values.update({f"summary/epsilon/{metric_name(site)}": v["epsilon"]
                       for site, v in summary.privacy["sites"].items()})
    return {k: float(v) for k, v in values.items() if _is_number(v)}


def metric_name(key: str) -> str:
    """A site or kind name as a metric-name part: characters trackers reject become ``_``
    (MLflow takes letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", key)


def _is_number(value: object) -> bool:
    """A number to log (NaN included: a diverged loss must show); None is left out."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def notify_all(observers: list[RunObserver], event: str, *args: object) -> None:
    """Call ``event`` on each observer; one that raises is logged and dropped (the run
    folder keeps the record) so that a tracker outage does not stop the run."""
    for observer in list(observers):
        try:
            getattr(observer, event)(*args)
        except Exception:
            log.exception("experiment tracker %s failed on %s and is dropped for the rest "
                          "of the run (the run folder has everything)",
                          type(observer).__name__, event)
            observers.remove(observer)


def final_version(folder: RunFolder, rows: Sequence[RoundRecord]) -> Path | None:
    """The adapter version of the last recorded round (the run's final adapter)."""
    if not rows:
        return None
    path = folder.version(rows[-1].round)
    return path if path.is_dir() else None
