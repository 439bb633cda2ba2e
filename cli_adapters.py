"""``fedcpt adapters``: a run's adapter versions — list, show, find a site's data in them,
export for serving (with a site's specialised adapter), specialise at a site, roll back,
withdraw a site."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedcpt.cli_output import setup_logging

adapters_cli = typer.Typer(no_args_is_help=True, help="Adapter versions of a run.")


@adapters_cli.command("list")
def adapters_list(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Every version: round, parent, sites, general and domain loss."""
    from rich.table import Table

    from fedcpt.runfolder.versions import list_versions

    table = Table(title=f"Adapter versions in {run_dir}")
    for col in ("round", "parent", "sites", "general loss", "domain loss", "server steps"):
        table.add_column(col)
    for v in list_versions(run_dir):
        domain = v["metrics"]["domain_loss"]
        table.add_row(str(v["round"]), v["parent"], ", ".join(v["sites"]) or "—",
                      f"{v['metrics']['general_loss']:.4f}",
                      "n/a" if domain is None else f"{domain:.4f}",
                      ", ".join(v["server_steps"]) or "—")
    Console().print(table)


@adapters_cli.command("show")
def adapters_show(run_dir: Path = typer.Argument(...),
                  server_round: int = typer.Argument(..., metavar="ROUND"),
                  ca: Path | None = typer.Option(
                      None, "--ca", help="Federation CA certificate to verify the sites' "
                      "attestations against (default: a simulation's simulated-ca.pem)."),
                  ) -> None:
    """One version's provenance as JSON, then each site's attestation: verified, FAILED or
    unattested (exit 1 if any FAILED)."""
    from fedcpt.runfolder.versions import version_dir
    from fedcpt.tools.attestations import FAILED, verify_run_version

    print((version_dir(run_dir, server_round) / "version.json").read_text().strip())
    verdicts = verify_run_version(run_dir, server_round, ca)
    print("attestations:")
    for verdict in verdicts:
        print(f"  {verdict.line()}")
    if any(v.status == FAILED for v in verdicts):
        raise typer.Exit(1)


@adapters_cli.command("contains")
def adapters_contains(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    record: Path = typer.Option(..., "--record", help="The site's own attestation record "
                                "(<site>.attestations.jsonl beside its ledger)."),
    ca: Path | None = typer.Option(None, "--ca", help="Federation CA certificate (default: "
                                   "a simulation's simulated-ca.pem)."),
) -> None:
    """The versions whose verified attestation matches the site's own record: those that
    contain its data."""
    from fedcpt.tools.attestations import versions_with_site_data

    found = versions_with_site_data(run_dir, record, ca)
    for server_round, site in found:
        print(f"round-{server_round:03d}: {site}")
    if not found:
        print(f"no version of {run_dir} carries an attestation in {record}")


@adapters_cli.command("export")
def adapters_export(run_dir: Path = typer.Argument(...),
                    server_round: int = typer.Argument(..., metavar="ROUND"),
                    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
                    site_adapter: Path | None = typer.Option(
                        None, "--site-adapter", help="A site's specialised adapter "
                        "(site-track/<site>/vNNN) trained on this version: merged in too."),
                    ) -> None:
    """Merge a version (and optionally a site's specialised adapter on it) into the base
    model and save it for serving (from_pretrained)."""
    setup_logging(False)
    if site_adapter is None:
        from fedcpt.runfolder.versions import export_version

        print(export_version(run_dir, server_round, out))
        return
    from fedcpt.client.site_track import export_specialised

    path, record = export_specialised(run_dir, server_round, site_adapter, out)
    print(path)
    typer.echo(f"site adapter privacy: {record['privacy']['statement']}", err=True)


@adapters_cli.command("specialise")
def adapters_specialise(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    server_round: int = typer.Argument(..., metavar="ROUND", help="The general version."),
    site: str | None = typer.Option(None, "--site", help="A simulated site of the run."),
    node_config: str | None = typer.Option(None, "--node-config", help="A deployed site's "
                                           "own --node-config text (its data, policy, "
                                           "ledger)."),
    steps: int = typer.Option(50, "--steps", help="Training steps."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the run's)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Blocks per step "
                                          "(default: the run's)."),
    seed: int | None = typer.Option(None, "--seed", help="LoRA and batch seed (default: "
                                    "the run's)."),
    dp_epsilon: float | None = typer.Option(None, "--dp-epsilon", help="Train with DP-SGD, "
                                            "the site's ledger staying at or below this "
                                            "total ε (required under require-dp)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Site-track folder (default: "
                                    "site-track/ beside the site's ledger)."),
) -> None:
    """At a site: train a specialised adapter on top of version ROUND on the site's own
    training units, kept at the site as site-track/<site>/vNNN; print the held-out domain
    loss of both tracks and whether DP trained it."""
    setup_logging(False)
    from fedcpt.client.site_track import TrackSettings, specialise

    node = None
    if node_config is not None:
        from fedcpt.deploy.site_check import check_node_config, parse_node_config

        node = parse_node_config(node_config)
        check_node_config(node)
    track = specialise(run_dir, server_round, site=site, node_config=node,
                       settings=TrackSettings(steps, lr, batch_size, seed, dp_epsilon),
                       out=out)
    for line in track.lines():
        print(line)


@adapters_cli.command("rollback")
def adapters_rollback(
    run_dir: Path = typer.Argument(...),
    server_round: int = typer.Argument(..., metavar="ROUND"),
    rounds: int | None = typer.Option(None, help="Rounds to run (default: the run's)."),
    out: Path | None = typer.Option(None, "--out", "-o"),
) -> None:
    """Continue the run's federation from an earlier version (a new run folder)."""
    setup_logging(False)
    from fedcpt.runfolder.paths import new_run_dir
    from fedcpt.runfolder.versions import continue_from
    from fedcpt.simulations.runner import simulate as run

    cfg = continue_from(run_dir, server_round, rounds)
    target = new_run_dir("runs", cfg.name, exact=out)
    run(cfg, target)
    print(target / "report.md")


@adapters_cli.command("forget")
def adapters_forget(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    site: str = typer.Argument(..., help="The site to withdraw."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Replay folder (default: RUN-without-SITE)."),
) -> None:
    """Replay the federation without SITE from the last version before it contributed;
    print the removal certificate (also written to the replay's folder)."""
    setup_logging(False)
    import json

    from fedcpt.runfolder.paths import new_run_dir
    from fedcpt.simulations.runner import simulate as run
    from fedcpt.tools.forget import certificate_line, certify, plan_forget

    plan = plan_forget(run_dir, site)
    target = None
    if plan.config is not None:
        default = run_dir.parent / f"{run_dir.name}-without-{site}"
        target = new_run_dir("", "", exact=out or default)
        run(plan.config, target)
    cert = certify(plan, target)
    print(json.dumps(cert, indent=2))
    print(certificate_line(cert))
