"""Experiment tracking (``[tracking]``): which tracker the server mirrors the run folder
into. Off by default; then no tracker is imported (:mod:`fedcpt.server.reports.tracking`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from fedcpt.config.fields import opt as _opt
from fedcpt.config.rules import require


@dataclass(frozen=True)
class TrackingConfig:
    """Round metrics, each site's ε, the drift signals, the report and the final adapter,
    mirrored into MLflow and/or TensorBoard by the server (needs `fedcpt[tracking]`)."""

    backends: tuple[Literal["mlflow", "tensorboard"], ...] = _opt(
        (), "Trackers to log to (empty: none, and none is imported).")
    mlflow_uri: str = _opt(
        "", "MLflow tracking URI (e.g. `http://mlflow:5000`); empty: a SQLite store "
        "`mlflow.db` with artifacts in `mlflow-artifacts/`, both in the run folder. The "
        "run config is sent to every site, so put credentials in MLflow's environment "
        "variables (`MLFLOW_TRACKING_TOKEN`, ...), never in the URI.")
    mlflow_experiment: str = _opt("fedcpt", "MLflow experiment the run is logged under.")
    tensorboard_dir: str = _opt(
        "", "Folder of the TensorBoard event files; empty: `tensorboard/` in the run folder.")

    def __post_init__(self) -> None:
        require(len(set(self.backends)) == len(self.backends), "tracking.backends",
                self.backends, "each tracker once")
        parts = urlsplit(self.mlflow_uri)
        require(parts.username is None and parts.password is None, "tracking.mlflow_uri",
                "<hidden: it holds credentials>", "a URI without credentials (the run config "
                "is sent to every site; use MLflow's environment variables)")
        require(bool(self.mlflow_experiment), "tracking.mlflow_experiment",
                self.mlflow_experiment, "a non-empty name")

    @property
    def enabled(self) -> bool:
        return bool(self.backends)
