"""Mirrors a run into TensorBoard event files (imported only when ``tracking.backends``
names it): a scalar per metric at each round, the summary, and the report as text."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from fedcpt.config import RunConfig
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import RoundRecord, Summary
from fedcpt.server.reports.tracking import round_metrics, summary_metrics


class TensorBoardObserver:
    """Writes ``tracking.tensorboard_dir`` (default: ``tensorboard/`` in the run folder)."""

    def __init__(self, cfg: RunConfig, folder: RunFolder) -> None:
        self.folder = folder
        self.log_dir = Path(cfg.tracking.tensorboard_dir or folder.root / "tensorboard")
        self.writer: SummaryWriter | None = None

    def run_started(self, run_id: str) -> None:
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("run_id", run_id)

    def round_recorded(self, record: RoundRecord) -> None:
        for name, value in round_metrics(record).items():
            self.writer.add_scalar(name, value, record.round)
        self.writer.flush()

    def run_finished(self, summary: Summary, final_version: Path | None) -> None:
        for name, value in summary_metrics(summary).items():
            self.writer.add_scalar(name, value, summary.rounds)
        if self.folder.report.is_file():
            self.writer.add_text("report", self.folder.report.read_text(encoding="utf-8"),
                                 summary.rounds)
        self.writer.close()

    def run_failed(self, error: BaseException) -> None:
        if self.writer is not None:
            self.writer.add_text("error", f"{type(error).__name__}: {error}")
            self.writer.close()
