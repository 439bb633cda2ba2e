"""What the ``fedcpt`` command line shows: its logging (screen and ``run.log``) and the
finished run's summary table."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
log = logging.getLogger("fedcpt")


CHATTER = ("flwr", "ray", "transformers", "urllib3", "filelock", "huggingface_hub")
"""Loggers whose lines go to run.log only (``--verbose`` shows them); their warnings and
Python's FutureWarnings are chatter too, fedcpt's own warnings never are."""


def setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    """fedcpt's INFO (only WARNING with a ``log_file``: the live view shows progress) to
    the screen, with ``--verbose`` everything; with ``log_file``, all of it to that file."""
    handler = RichHandler(console=console, show_path=False, markup=False)
    handler.setLevel(logging.DEBUG if verbose else
                     logging.WARNING if log_file is not None else logging.INFO)
    if not verbose:
        handler.addFilter(lambda record: record.name.split(".")[0] == "fedcpt")
    handlers: list[logging.Handler] = [handler]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        handlers.append(to_file)
    logging.basicConfig(level=logging.INFO, handlers=handlers, format="%(message)s",
                        force=True)
    logging.captureWarnings(True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in CHATTER:
        chatter = logging.getLogger(name)
        chatter.handlers.clear()  # Flower's own console handler would print it a second time
        chatter.propagate = True
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.table import Table

    def nats(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.4f} nats"

    table = Table(title="Run finished", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    general = summary.get("general_loss") or {}
    if general:
        table.add_row("general loss", f"{general.get('base', float('nan')):.4f} → "
                                      f"{general.get('final', float('nan')):.4f}")
    table.add_row("forgetting", nats(summary.get("forgetting")))
    table.add_row("adaptation", nats(summary.get("adaptation")))
    privacy = summary.get("privacy") or {}
    if privacy.get("max_epsilon") is not None:
        table.add_row("ε spent (max over sites)", f"{privacy['max_epsilon']:.3f} (from the "
                                                  "site ledgers)")
    elif privacy:
        table.add_row("ε spent", "held by the sites (`fedcpt privacy report` at each)")
    table.add_row("wall time", f"{summary.get('wall_time_s', 0):.0f} s")
    table.add_row("report", str(run_dir / "report.md"))
    table.add_row("full log", str(run_dir / "run.log"))
    console.print(table)
