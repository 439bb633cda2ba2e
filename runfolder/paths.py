"""Every path of a run folder, named once.

A run folder is finished only when ``summary.json`` exists; it is written last. A run that
fails leaves ``error.txt`` instead, so nobody mistakes it for a result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fedcpt.exceptions import ConfigError


@dataclass(frozen=True)
class RunFolder:
    """The files of one run under ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        """Config, package versions, data hashes, run id (written at the start)."""
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        """One :class:`~fedcpt.runfolder.records.RoundRecord` per line, round 0 first."""
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        """What ``--resume`` needs after the last finished round."""
        return self.root / "checkpoint.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        """The same report as one self-contained page (plots inline)."""
        return self.root / "report.html"

    @property
    def continuations(self) -> Path:
        """The base model's and the final adapter's continuations of ``[report]``'s prompts."""
        return self.root / "continuations.json"

    @property
    def error(self) -> Path:
        return self.root / "error.txt"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def base_answers(self) -> Path:
        """The base model's answers to the built-in prompts, scored every round."""
        return self.root / "base-answers.json"

    @property
    def ledgers(self) -> Path:
        """Simulated sites' privacy ledgers, when the config names no other folder."""
        return self.root / "ledgers"

    @property
    def simulated_ca(self) -> Path:
        """The simulation's throwaway CA certificates (PEM bundle, one per start or resume):
        what simulated sites' attestations are verified against."""
        return self.root / "simulated-ca.pem"

    def version(self, server_round: int) -> Path:
        """The adapter version saved after ``server_round`` (peft format + version.json)."""
        return self.adapters / f"round-{server_round:03d}"

    def provenance(self, server_round: int) -> Path:
        """``version.json`` of a version: parent, sites, data hashes, config hash."""
        return self.version(server_round) / "version.json"

    def plot(self, name: str) -> Path:
        return self.root / name

    def mark_failed(self, error: BaseException) -> None:
        """Write ``error.txt``: the folder holds a failed run (no summary.json follows)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.error.write_text(f"{type(error).__name__}: {error}\n", encoding="utf-8")


def new_run_dir(root: str | Path, name: str, exact: str | Path | None = None) -> Path:
    """``exact`` if given, else ``<root>/<name>-<timestamp>``; never a non-empty folder."""
    path = Path(exact) if exact else Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"output folder {path} already exists and is not empty")
    return path
