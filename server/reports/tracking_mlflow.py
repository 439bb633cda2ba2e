"""Mirrors a run into MLflow (imported only when ``tracking.backends`` names it).

By default the tracking store is a SQLite file in the run folder (MLflow's file store is
in maintenance mode and refuses new use) with artifacts beside it; ``tracking.mlflow_uri``
names any other store or server. The MLflow run is tagged with fedcpt's run id, so a
resumed run continues the same MLflow run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from fedcpt.config import RunConfig
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import RoundRecord, Summary
from fedcpt.server.reports.tracking import round_metrics, summary_metrics

RUN_ID_TAG = "fedcpt.run_id"


def local_store(folder: RunFolder) -> tuple[str, str]:
    """The default tracking URI and artifact location: both inside the run folder."""
    root = folder.root.resolve()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlflow-artifacts").as_uri()


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The config's scalar settings as ``section.key`` parameters (lists, e.g. the sites,
    are in the ``manifest.json`` artifact)."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        elif not isinstance(value, (list, tuple)):
            text = str(value)
            if len(text) <= MAX_PARAM_VAL_LENGTH:
                params[prefix.rstrip(".")] = text

    walk("", cfg.to_dict())
    return params


class MlflowObserver:
    """One MLflow run per fedcpt run: config as parameters, a step per round, and at the
    end the summary, the report, the metrics, the manifest and the final adapter."""

    def __init__(self, cfg: RunConfig, folder: RunFolder) -> None:
        self.cfg, self.folder = cfg, folder
        self.uri, self.artifact_location = local_store(folder)
        if cfg.tracking.mlflow_uri:
            self.uri, self.artifact_location = cfg.tracking.mlflow_uri, None
        self.client: MlflowClient | None = None  # opened when the run folder exists
        self.mlflow_run = ""

    def run_started(self, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=self.uri)
        name = self.cfg.tracking.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(name, self.artifact_location))
        previous = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
        if previous:  # a resumed run
            self.mlflow_run = previous[0].info.run_id
            self.client.update_run(self.mlflow_run, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, run_name=self.folder.root.name,
                                     tags={RUN_ID_TAG: run_id,
                                           "fedcpt.run_folder": str(self.folder.root)})
        self.mlflow_run = run.info.run_id
        params = [Param(k, v) for k, v in config_params(self.cfg).items()]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.mlflow_run,
                                  params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def round_recorded(self, record: RoundRecord) -> None:
        self._log_metrics(round_metrics(record), record.round)

    def run_finished(self, summary: Summary, final_version: Path | None) -> None:
        self._log_metrics(summary_metrics(summary), summary.rounds)
        folder = self.folder
        for path in (folder.report, folder.report_html, folder.summary, folder.metrics,
                     folder.manifest):
            if path.is_file():
                self.client.log_artifact(self.mlflow_run, str(path))
        if final_version is not None:
            self.client.log_artifacts(self.mlflow_run, str(final_version), "adapter")
        self.client.set_terminated(self.mlflow_run, RunStatus.to_string(RunStatus.FINISHED))

    def run_failed(self, error: BaseException) -> None:
        if not self.mlflow_run:
            return
        self.client.set_tag(self.mlflow_run, "fedcpt.error",
                            f"{type(error).__name__}: {error}"[:5000])
        self.client.set_terminated(self.mlflow_run, RunStatus.to_string(RunStatus.FAILED))

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.mlflow_run,
                                  metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
