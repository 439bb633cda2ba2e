"""The app on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1, with
TLS and SuperNode authentication, driven by the ``flwr`` CLI. Under ``flwr run`` secure
aggregation is on by default (``secagg.mode = "auto"``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from local_federation import LocalFederation, free_port, wait_for

from fedcpt.deploy.certs import write_federation_certs

pytestmark = pytest.mark.slow

SITES = ["north", "south", "east"]


def site_paths(sites_config: Path) -> dict[str, str]:
    """Each site's text file, from the shared ``sites_config`` fixture."""
    sites = tomllib.loads(sites_config.read_text())["sites"]
    return {s["name"]: s["data"][0] for s in sites}


def node_config(site: str, data_path: str, ledger_dir: Path, extra: str = "") -> str:
    # Each test site is one generated text file of ~20 passages, its privacy unit: it holds
    # about two held-out passages, so (as the smoke scenario's [site_policy] does for its
    # simulated sites) it lets a plain evaluation query cover as few as one. A site with a
    # ledger has DP on by default; these run the non-DP smoke scenario, by their own choice.
    return (f'site-name="{site}" data-path="{data_path}" privacy-unit="passage" '
            f'eval-min-units=1 ledger-path="{ledger_dir / f"{site}.ledger.json"}" '
            f'require-dp=false {extra}').strip()


def start_sites(fed: LocalFederation, paths: dict[str, str],
                extra: dict[str, str] | None = None) -> None:
    for site, path in paths.items():
        fed.register(site)
        signing_key, signing_cert = fed.certs.signing[site]
        identity = (f'ca-cert="{fed.certs.ca_cert}" secagg-key="{signing_key}" '
                    f'secagg-cert="{signing_cert}"')
        fed.start_supernode(site, site, node_config(
            site, path, fed.root, f'{identity} {(extra or {}).get(site, "")}'))
    for site in paths:
        fed.wait_connected(site)


def run_to_summary(fed: LocalFederation, sites_config: Path, rounds: int,
                   timeout: float = 1800) -> tuple[dict, list[dict]]:
    """``flwr run`` the smoke scenario; wait for its run folder's summary.json (a
    liveness bound, not a speed check: CI's slower machines took over 900 s under load).

    Secure aggregation needs a bound on each site's update (``max_update_norm``)."""
    out = fed.root / "runs"
    run_id = fed.run(f'scenario="smoke" config-file="{sites_config}" '
                     f'set="federation.rounds={rounds} federation.max_update_norm=5.0" '
                     f'out-dir="{out}"')
    last_status_check = time.monotonic()

    def finished() -> bool:
        nonlocal last_status_check
        if list(out.glob("*/summary.json")):
            return True
        if time.monotonic() - last_status_check > 15:  # a ServerApp that failed early
            last_status_check = time.monotonic()        # leaves no run folder
            status = fed.run_status(run_id)
            if status.startswith("finished") and not list(out.glob("*/summary.json")):
                pytest.fail(f"run {run_id} {status}:\n{fed.server_log(run_id)[-4000:]}")
        return False

    wait_for(finished, timeout, "the run's summary.json", fed.logs())
    run_dir = next(out.glob("*/summary.json")).parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "summary.json").read_text()), rows


def test_four_sites_with_tls_and_node_auth_one_without_its_data(federation,
                                                             sites_config: Path) -> None:
    """One deployed federation for every deployment check: a deployed round costs minutes
    (every message starts a ClientApp process per site, Flower's process isolation), so
    the TLS, node-auth and refused-SuperNode checks share the run in which one site fails
    alone."""
    sites = [*SITES, "west"]  # secure aggregation unmasks no sum of fewer than 3 updates
    fed = federation([*sites, "unregistered"])
    fed.start_superlink()
    paths = site_paths(sites_config)
    paths["west"] = paths["north"]
    paths["east"] = str(fed.root / "no-such-folder" / "east.txt")
    # The site's preflight passes against the real SuperLink (TCP, TLS verified with the CA).
    check = subprocess.run(
        [sys.executable, "-m", "fedcpt.cli", "site", "check", "--scenario", "smoke",
         "--config", str(sites_config), "--node-config", node_config("north", paths["north"],
                                                                     fed.root),
         "--superlink", fed.address, "--root-certificates", str(fed.certs.ca_cert),
         "--auth-key", str(fed.certs.site_keys["north"][0])],
        capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert f"SuperLink: {fed.address} answers, TLS certificate verified" in check.stdout
    # north refuses any round without secure aggregation: the run must use it.
    start_sites(fed, paths, extra={"north": "require-secagg=true"})

    # Sites that got something wrong are refused, exit with a clear error, and leave the
    # federation to the others: a key the operator never registered, a CA of another
    # federation, a key file that is not a key, a SuperLink address that does not answer.
    other = write_federation_certs(fed.root / "other-certs", ["127.0.0.1"], ["x"])
    garbage = fed.root / "garbage.key"
    garbage.write_text("not a key\n")
    once = ("--max-retries", "1")
    config = node_config("intruder", paths["north"], fed.root)
    bad = {
        "unregistered": fed.start_supernode("unregistered", "unregistered", config),
        "wrong-ca": fed.start_supernode("wrong-ca", "north", config,
                                        root_certificates=other.ca_cert, extra=once),
        "garbage-key": fed.start_supernode("garbage-key", "north", config, key=garbage),
        "no-superlink": fed.start_supernode("no-superlink", "north", config, extra=once,
                                            superlink=f"127.0.0.1:{free_port()}"),
    }
    expected = {
        "unregistered": "Failed to activate SuperNode",
        "wrong-ca": "certificate verify failed: unable to get local issuer certificate",
        "garbage-key": "Unable to parse the private key file",
        "no-superlink": "Connection refused",
    }
    for name, proc in bad.items():
        assert proc.wait(timeout=90) != 0, name
        assert expected[name] in fed.log(f"supernode-{name}").read_text(), name
    assert "No SuperNode found with the given public key" in fed.log("superlink").read_text()

    run_sites = fed.root / "four-sites.toml"  # the run waits for, and samples, four sites
    run_sites.write_text("".join(f'[[sites]]\nname = "{s}"\ndata = ["{paths["north"]}"]\n\n'
                                 for s in sites))
    summary, rows = run_to_summary(fed, run_sites, rounds=1)
    assert summary["num_sites"] == len(sites)
    assert summary["rounds"] == 1 and summary["rounds_aggregated"] == 1
    assert [r["round"] for r in rows] == [0, 1]
    # the refused SuperNodes ("intruder") never took part, and east failed alone
    assert sorted(rows[1]["sites_trained"]) == ["north", "south", "west"]
    assert summary["failures"] == 1
    (failure,) = rows[1]["failures"]
    # the server learns only the gate's generic sentence; the path stays in east's own log
    assert "site east:" in failure and "site's own log" in failure
    assert paths["east"] not in failure and "no-such-folder" not in failure
    # the three others' sum was still unmasked; under SecAgg the sites evaluate masked too,
    # so the server learned only their sum
    assert summary["secagg"]["enabled"] is True
    assert summary["domain_loss"]["per_site"] == {}
    assert summary["domain_loss"]["secure_sum"]["sites"] == 3  # east dropped out of it
    # The site's own log says what to fix, in one line each time, with no traceback.
    east_log = fed.log("supernode-east").read_text()
    assert f"data path not found: {paths['east']}" in east_log
    assert ("site east cannot take part in this evaluate.secagg_masked round: data path not "
            "found") in east_log
    assert "Traceback" not in east_log
