"""Run a configured federation on Flower's Simulation Engine (Ray backend).

``simulate`` checks everything it can before Ray starts (config, model, every site's data,
the general data), so bad input fails in seconds with one clear error and no run folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.simulation import run_simulation

from fedcpt.client.app import app as client_app
from fedcpt.client.site import open_ledger, policy_for, site_blocks
from fedcpt.config import RunConfig
from fedcpt.core.adapters import load_version
from fedcpt.core.model import load_adapted_model
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.plan import SitePlan, plan_run
from fedcpt.privacy.policy import accept_proposal
from fedcpt.privacy.release import eval_reservation
from fedcpt.server.app import general_eval_blocks, make_server_app, with_default_ledger_dir

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig, run_id: str = "") -> list[SitePlan]:
    """Load the model (fetching it if needed) and every data source once; with DP on, open
    each site's ledger and plan its noise (raising for impossible budgets or bad ledgers).

    The server runs in this process, so the model loaded here is the one it uses."""
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


def backend_config(cfg: RunConfig) -> dict:
    sim = cfg.simulation
    init_args: dict = {}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    else:
        init_args["num_cpus"] = sim.num_cpus or len(os.sched_getaffinity(0))
    return {
        "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client},
        "init_args": init_args,
    }


def simulate(cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run ``cfg`` with one simulated SuperNode per site; returns the run summary.

    ``resume`` continues the interrupted run in ``run_dir`` (see :func:`run_federation`).
    Secure aggregation runs only when ``secagg.mode = "on"``."""
    cfg = with_default_ledger_dir(cfg.with_secagg_resolved(deployment=False), run_dir)
    run_id = json.loads((run_dir / "manifest.json").read_text())["run_id"] if resume else ""
    preflight(cfg, run_id)
    server_app = make_server_app(cfg, run_dir, resume)
    log.info("Simulating %d sites for %d rounds; outputs in %s", len(cfg.sites),
             cfg.federation.rounds, run_dir)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(cfg.sites),
                   backend_config=backend_config(cfg))
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise FedcptError(f"the simulation ended without a result; see {run_dir}/error.txt "
                          "and the log above")
    return json.loads(summary.read_text())
