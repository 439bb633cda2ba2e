"""Run a configured federation on Flower's Simulation Engine (Ray backend) via ``flwr run``.

``simulate`` checks everything it can before Ray starts (config, model, every site's data,
the general data), so bad input fails in seconds with one clear error and no run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from fedcpt.server.app import JOB_MARK, general_eval_blocks, with_default_ledger_dir
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
                                  steps=cfg.training_rounds(site.name) * cfg.train.local_steps,
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


@dataclass(frozen=True)
class Job:
    """One run on a simulation engine: its checked config and its run folder."""

    cfg: RunConfig
    run_dir: Path


def prepare(cfg: RunConfig, run_dir: Path, run_id: str = "") -> Job:
    """``cfg`` as it will run in ``run_dir`` (simulated secure aggregation resolved, DP
    ledgers in the run folder unless configured), checked by :func:`preflight`."""
    cfg = with_default_ledger_dir(cfg.with_secagg_resolved(deployment=False), run_dir)
    preflight(cfg, run_id)
    return Job(cfg, run_dir.resolve())


@contextlib.contextmanager
def simulated_identities(cfgs: list[RunConfig], run_dirs: list[Path]) -> Iterator[None]:
    """Under secure aggregation, a throwaway CA and one signing identity per site for the
    simulation's duration (in a temporary folder the local Ray workers find through the
    environment they inherit). The identities last the whole engine, so the sites sign in
    every run on it, secure or not: the CA certificate (public) is appended to the
    ``simulated-ca.pem`` of every run folder on the engine, so that every attestation can
    be verified after the run."""
    if not any(c.secagg.enabled for c in cfgs):
        yield
        return
    names = list(dict.fromkeys(s.name for c in cfgs for s in c.sites))
    with tempfile.TemporaryDirectory(prefix="fedcpt-secagg-") as folder:
        provision_simulated_identities(Path(folder), names)
        for run_dir in run_dirs:
            run_dir.mkdir(parents=True, exist_ok=True)
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


JOB_LINE = re.compile(rf"{JOB_MARK} (\d+) of \d+: ")


class RunLogs:
    """Streamed lines into the ``run.log`` of the run they belong to: the ServerApp logs
    :data:`JOB_MARK` before each run of a ``jobs`` list; earlier lines (the engine's start)
    go to the first run's log."""

    def __init__(self, run_dirs: list[Path], on_line: Callable[[str], None] | None) -> None:
        self.run_dirs, self.on_line = run_dirs, on_line
        self.current = open(run_dirs[0] / "run.log", "a", encoding="utf-8")

    def record(self, line: str) -> None:
        mark = JOB_LINE.search(line)
        if mark is not None and 1 < int(mark.group(1)) <= len(self.run_dirs):
            self.current.close()
            path = self.run_dirs[int(mark.group(1)) - 1] / "run.log"
            self.current = open(path, "a", encoding="utf-8")
        self.current.write(line + "\n")
        self.current.flush()
        if self.on_line is not None:
            self.on_line(line)

    def close(self) -> None:
        self.current.close()


def simulate(cfg: RunConfig, run_dir: Path, resume: bool = False,
             on_line: Callable[[str], None] | None = None) -> dict:
    """Run ``cfg`` with one simulated SuperNode per site; returns the run summary.

    The run goes through Flower's supported path (:mod:`fedcpt.simulations.superlink`):
    a private simulation SuperLink and ``flwr run`` of this package's ServerApp and
    ClientApp. Every streamed log line is written to ``run.log`` in the run folder and
    passed to ``on_line``. ``resume`` continues the interrupted run in ``run_dir`` (see
    :func:`run_federation`). Secure aggregation runs only when ``secagg.mode = "on"``."""
    run_id = json.loads((run_dir / "manifest.json").read_text())["run_id"] if resume else ""
    job = prepare(cfg, run_dir, run_id)
    return simulate_many([job], on_line, resume=resume)[0]


def simulate_many(jobs: list[Job], on_line: Callable[[str], None] | None = None,
                  resume: bool = False) -> list[dict]:
    """Run ``jobs`` (from :func:`prepare`) one after another on one engine start (one
    SuperLink, one Ray runtime, one ServerApp process and its ClientApp workers): each
    further run costs its work, not another ~25 s start. Every run folder is what
    :func:`simulate` writes for that config alone. Returns the runs' summaries; raises for
    the first run that did not finish (the runs after it do not start). ``resume``: one
    job, the interrupted run in its folder."""
    if not jobs:
        raise ValueError("simulate_many needs at least one job")  # a bug, never user input
    if resume and len(jobs) != 1:
        raise ValueError("resume continues one run")  # a bug, never user input
    federations = {json.dumps(federation_config(job.cfg), sort_keys=True) for job in jobs}
    if len(federations) != 1:
        raise ConfigError("runs on one simulation engine need the same federation (number "
                          f"of sites and resources); got {sorted(federations)}")
    run_dirs = [job.run_dir for job in jobs]
    for job in jobs:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        log.info("Simulating %d sites for %d rounds; outputs in %s", len(job.cfg.sites),
                 job.cfg.federation.rounds, job.run_dir)
    with tempfile.TemporaryDirectory(prefix="fedcpt-flwr-") as home:
        if resume:
            run_config = {"resume": str(run_dirs[0])}
        else:  # the validated configs and exact folders, for the ServerApp's process
            listing = Path(home) / "jobs.json"
            listing.write_text(json.dumps([{"config": job.cfg.to_json(),
                                            "run_dir": str(job.run_dir)} for job in jobs]),
                               encoding="utf-8")
            run_config = {"jobs": str(listing)}
        logs = RunLogs(run_dirs, on_line)
        try:
            with simulated_identities([job.cfg for job in jobs], run_dirs), \
                    LocalSuperLink(Path(home) / "flwr-home") as superlink:
                status = superlink.run(run_config, federation_config(jobs[0].cfg),
                                       logs.record)
        finally:
            logs.close()
    summaries = [_summary(RunFolder(run_dir), status) for run_dir in run_dirs]
    if status != 0:
        raise SimulationFailed(f"flwr run exited {status} after the runs finished; see "
                               f"{run_dirs[-1] / 'run.log'}")
    return summaries


def _summary(folder: RunFolder, status: int) -> dict:
    """A finished run's summary, or the error that says why it did not finish."""
    if folder.summary.is_file():
        return json.loads(folder.summary.read_text())
    if folder.error.is_file():  # the ServerApp's own account of why the run stopped
        raise FedcptError(f"the run failed: {folder.error.read_text().strip()} "
                          f"(full log: {folder.root / 'run.log'})")
    raise SimulationFailed(f"the simulation ended without a result (flwr run exit "
                           f"{status}); see {folder.root / 'run.log'}")
