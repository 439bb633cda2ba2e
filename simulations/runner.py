"""Run a configured federation on Flower's Simulation Engine (Ray backend) via ``flwr run``.

``simulate`` checks everything it can before Ray starts (config, model, every site's data,
the general data), so bad input fails in seconds with one clear error and no run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fedcpt.client.site import open_ledger, policy_for, site_blocks
from fedcpt.config import RunConfig
from fedcpt.core.adapters import load_version
from fedcpt.core.model import load_adapted_model
from fedcpt.deploy.certs import provision_simulated_identities
from fedcpt.exceptions import ConfigError, FedcptError, SimulationFailed
from fedcpt.privacy.plan import SitePlan, plan_run
from fedcpt.privacy.policy import accept_proposal
from fedcpt.privacy.release import eval_reservation
from fedcpt.privacy.secagg.identity import SIMULATION_IDENTITIES_ENV
from fedcpt.runfolder.paths import RunFolder
from fedcpt.server.app import general_eval_blocks, with_default_ledger_dir
from fedcpt.simulations.superlink import LocalSuperLink

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig, run_id: str = "") -> list[SitePlan]:
    """Load the model (fetching it if needed) and every data source once; with DP on, open
    each site's ledger and plan its noise (raising for impossible budgets or bad ledgers).

    It runs in the CLI's process, before the SuperLink starts: loading here fetches the
    model into the local cache and fails early. The ServerApp and the ClientApps run in
    their own processes and load the model again."""
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    if cfg.federation.initial_adapter:
        load_version(cfg.federation.initial_adapter, lm.initial_adapter)
    plans = []
    for site in cfg.sites:
        policy = policy_for(cfg, site, {})
        blocks = site_blocks(site, cfg.model, cfg.data, policy)  # also fixes its split
        records = blocks.units
        if cfg.privacy.enabled:
            ledger = open_ledger(cfg, policy, accept_proposal(policy, cfg, records))
            plans.append(plan_run(cfg.privacy, ledger, records=records,
                                  batch_size=cfg.train.batch_size,
                                  steps=cfg.federation.rounds * cfg.train.local_steps,
                                  run_id=run_id,
                                  reserved=eval_reservation(policy, cfg.federation.rounds)))
    general_eval_blocks(cfg)
    for plan in plans:
        if plan.expected_epsilon > cfg.privacy.target_epsilon:
            log.warning("site %s: σ=%.4f for %d steps would spend ε=%.3f, above its budget "
                        "%g; it will refuse rounds that cross it", plan.site,
                        plan.noise_multiplier, plan.steps, plan.expected_epsilon,
                        cfg.privacy.target_epsilon)
    return plans


def _whole(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def federation_config(cfg: RunConfig) -> dict:
    """``flwr run --federation-config`` for ``cfg``: one SuperNode per site, Ray resources."""
    sim = cfg.simulation
    if sim.ray_address:
        raise ConfigError("simulation.ray_address: flwr run's simulation SuperLink starts its "
                          "own Ray runtime; remove the setting")
    return {
        "num-supernodes": len(cfg.sites),
        # Flower's parser wants whole CPUs as an int (1, not 1.0)
        "client-resources-num-cpus": _whole(sim.cpus_per_client),
        "client-resources-num-gpus": _whole(sim.gpus_per_client),
        "init-args-num-cpus": sim.num_cpus or len(os.sched_getaffinity(0)),
    }


@contextlib.contextmanager
def simulated_identities(cfg: RunConfig, run_dir: Path | None = None) -> Iterator[None]:
    """Under secure aggregation, a throwaway CA and one signing identity per site for the
    simulation's duration (in a temporary folder the local Ray workers find through the
    environment they inherit). The CA certificate (public) is appended to the run folder's
    ``simulated-ca.pem``, so the sites' attestations can be verified after the run."""
    if not cfg.secagg.enabled:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="fedcpt-secagg-") as folder:
        provision_simulated_identities(Path(folder), [s.name for s in cfg.sites])
        if run_dir is not None:
            with RunFolder(run_dir).simulated_ca.open("ab") as bundle:
                bundle.write((Path(folder) / "ca.crt").read_bytes())
        previous = os.environ.get(SIMULATION_IDENTITIES_ENV)
        os.environ[SIMULATION_IDENTITIES_ENV] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(SIMULATION_IDENTITIES_ENV, None)
            else:
                os.environ[SIMULATION_IDENTITIES_ENV] = previous


def simulate(cfg: RunConfig, run_dir: Path, resume: bool = False,
             on_line: Callable[[str], None] | None = None) -> dict:
    """Run ``cfg`` with one simulated SuperNode per site; returns the run summary.

    The run goes through Flower's supported path (:mod:`fedcpt.simulations.superlink`):
    a private simulation SuperLink and ``flwr run`` of this package's ServerApp and
    ClientApp. Every streamed log line is written to ``run.log`` in the run folder and
    passed to ``on_line``. ``resume`` continues the interrupted run in ``run_dir`` (see
    :func:`run_federation`). Secure aggregation runs only when ``secagg.mode = "on"``."""
    cfg = with_default_ledger_dir(cfg.with_secagg_resolved(deployment=False), run_dir)
    run_id = json.loads((run_dir / "manifest.json").read_text())["run_id"] if resume else ""
    preflight(cfg, run_id)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("Simulating %d sites for %d rounds; outputs in %s", len(cfg.sites),
             cfg.federation.rounds, run_dir)
    with tempfile.TemporaryDirectory(prefix="fedcpt-flwr-") as home, \
            open(run_dir / "run.log", "a", encoding="utf-8") as run_log:
        if resume:
            run_config = {"resume": str(run_dir)}
        else:  # the validated config and the exact folder, for the ServerApp's process
            config_json = Path(home) / "config.json"
            config_json.write_text(cfg.to_json(), encoding="utf-8")
            run_config = {"config-json": str(config_json), "run-dir": str(run_dir)}

        def record(line: str) -> None:
            run_log.write(line + "\n")
            run_log.flush()
            if on_line is not None:
                on_line(line)

        with simulated_identities(cfg, run_dir), \
                LocalSuperLink(Path(home) / "flwr-home") as superlink:
            status = superlink.run(run_config, federation_config(cfg), record)
    folder = RunFolder(run_dir)
    if status == 0 and folder.summary.is_file():
        return json.loads(folder.summary.read_text())
    if folder.error.is_file():  # the ServerApp's own account of why the run stopped
        raise FedcptError(f"the run failed: {folder.error.read_text().strip()} "
                          f"(full log: {folder.root / 'run.log'})")
    raise SimulationFailed(f"the simulation ended without a result (flwr run exit "
                           f"{status}); see {folder.root / 'run.log'}")
