"""Experiment tracking with the real MLflow and TensorBoard: a smoke-dp simulation with both
trackers on, read back with the trackers' own readers; and, with tracking off, neither
library is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedcpt.config import load_config
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import RoundRecord
from fedcpt.server.reports.tracking import metric_name, round_metrics, tracking_observers


@pytest.fixture
def tracked_run(smoke_runs):
    """The shared smoke-dp simulation with MLflow and TensorBoard on (mark the test
    ``smoke_run("tracked")``): (config, run_dir, summary)."""
    run = smoke_runs["tracked"]
    return run.cfg, run.run_dir, run.summary


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # a shared smoke run (tests/conftest.py:SMOKE_RUNS, one engine start)
@pytest.mark.smoke_run("tracked")
def test_mlflow_run_reads_back_with_mlflow(tracked_run):
    from mlflow.tracking import MlflowClient

    cfg, run_dir, summary = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedcpt")
    run_id = json.loads((run_dir / "manifest.json").read_text())["run_id"]
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`fedcpt.run_id` = '{run_id}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "tiny-llama"
    assert run.data.params["privacy.enabled"] == "True"
    rows = _rows(run_dir)
    general = client.get_metric_history(run.info.run_id, "general_loss")
    assert sorted((m.step, m.value) for m in general) == \
        [(r["round"], pytest.approx(r["general_loss"])) for r in rows]
    sites = summary["privacy"]["sites"]  # each site's ε, read from its own ledger
    assert set(sites) == {s.name for s in cfg.sites}
    for site, entry in sites.items():
        assert run.data.metrics[f"summary/epsilon/{site}"] == pytest.approx(entry["epsilon"])
    assert run.data.metrics["summary/forgetting"] == pytest.approx(summary["forgetting"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "summary.json", "metrics.jsonl",
            "manifest.json", "adapter"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter


@pytest.mark.slow  # a shared smoke run (tests/conftest.py:SMOKE_RUNS, one engine start)
@pytest.mark.smoke_run("tracked")
def test_tensorboard_events_read_back_with_tensorboard(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, summary = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = _rows(run_dir)
    scalars = events.Tags()["scalars"]
    assert {"general_loss", "domain_loss", "summary/forgetting"} <= set(scalars)
    assert {f"summary/epsilon/{site}" for site in summary["privacy"]["sites"]} <= set(scalars)
    assert [(e.step, e.value) for e in events.Scalars("general_loss")] == \
        [(r["round"], pytest.approx(r["general_loss"])) for r in rows]
    assert "report/text_summary" in events.Tags()["tensors"]  # the report as text


def test_tracking_off_imports_no_tracker(tmp_path):
    """A run recorded start to finish without [tracking] imports neither library (checked
    in a fresh interpreter: this one has imported both)."""
    script = textwrap.dedent(f"""
        import sys
        from fedcpt.config import load_config
        from fedcpt.server.app import run_federation  # the server app and its recorder
        from fedcpt.client.app import app  # the site app
        from fedcpt.runfolder.paths import RunFolder
        from fedcpt.server.reports.tracking import tracking_observers
        cfg = load_config("smoke")
        assert tracking_observers(cfg, RunFolder({str(tmp_path)!r})) == []
        loaded = [m for m in sys.modules
                  if m.split(".")[0] in ("mlflow", "tensorboard", "tensorboardX")
                  or m.startswith("torch.utils.tensorboard")]
        assert not loaded, loaded
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_missing_tracker_is_a_config_error(tmp_path, monkeypatch):
    cfg = load_config("smoke", overrides=["tracking.backends=mlflow"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"fedcpt\[tracking\]"):
        tracking_observers(cfg, RunFolder(tmp_path))


def test_tracking_config_is_checked():
    with pytest.raises(ConfigError, match="tracking.backends"):
        load_config("smoke", overrides=["tracking.backends=wandb"])
    with pytest.raises(ConfigError, match="without credentials") as err:
        load_config("smoke", overrides=["tracking.mlflow_uri=https://me:secret@mlflow:5000"])
    assert "secret" not in str(err.value)


def test_round_metrics_names_and_absent_values():
    record = RoundRecord(
        round=2, phase="all", general_loss=3.0, general_perplexity=20.0, general_ece=0.1,
        domain_loss=None, domain_per_site={"a/b": 2.5}, domain_ece=None, aggregated=True,
        sites_trained=["a/b"], train_loss=None, update_norm_per_site={}, bytes_up_per_client=8,
        failures=[], server_steps={}, elapsed_s=1.0,
        drift={"update_ratio": 1.2, "general_loss_rise": None, "flags": ["x"],
               "rolled_back_to": None})
    metrics = round_metrics(record)
    assert metrics["general_loss"] == 3.0
    assert "domain_loss" not in metrics and "train_loss" not in metrics  # absent, not 0
    assert metrics["domain_loss/a_b"] == 2.5
    assert not any(k.startswith("epsilon") for k in metrics)  # no reply carries ε
    assert metrics["drift/update_ratio"] == 1.2 and metrics["drift/flags"] == 1.0
    assert "drift/general_loss_rise" not in metrics
    assert metrics["aggregated"] == 1.0
    assert metric_name("ünï site") == "_n_ site"


def test_mlflow_marks_a_failed_run_and_a_resume_continues_it(tmp_path):
    """The observer alone on a real SQLite store: a failure is recorded as FAILED with its
    error, and the same fedcpt run id started again (a resume) continues that MLflow run."""
    from mlflow.tracking import MlflowClient

    from fedcpt.server.reports.tracking_mlflow import MlflowObserver, local_store

    cfg = load_config("smoke", overrides=["tracking.backends=mlflow"])
    folder = RunFolder(tmp_path)
    first = MlflowObserver(cfg, folder)
    first.run_started("run-1")
    first.run_failed(RuntimeError("site lost"))
    client = MlflowClient(tracking_uri=local_store(folder)[0])
    failed = client.get_run(first.mlflow_run)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["fedcpt.error"] == "RuntimeError: site lost"
    again = MlflowObserver(cfg, folder)
    again.run_started("run-1")
    assert again.mlflow_run == first.mlflow_run
    assert client.get_run(first.mlflow_run).info.status == "RUNNING"
