"""Run a configured federation on Flower's Simulation Engine (Ray backend).

``simulate`` checks everything it can before Ray starts (config, model, every site's data,
the general data), so bad input fails in seconds with one clear error and no run folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.simulation import run_simulation

from fedcpt.client.app import app as client_app
from fedcpt.client.site import open_ledger
from fedcpt.config import RunConfig
from fedcpt.core.data import TokenBlocks, build_blocks
from fedcpt.core.model import load_tokenizer
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.plan import SitePlan, plan_site
from fedcpt.server.app import general_eval_blocks, make_server_app

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig) -> list[SitePlan]:
    """Load the tokenizer (fetching the model if needed) and every data source once; with
    DP on, plan each site's noise (raising for impossible budgets) and return the plans."""
    tokenizer = load_tokenizer(cfg.model)
    plans = []
    built: dict[tuple[str, ...], TokenBlocks] = {}  # sites may share sources in simulations
    for site in cfg.sites:
        if site.data not in built:
            built[site.data] = build_blocks(
                site.data, tokenizer, block_size=cfg.data.block_size,
                heldout_fraction=cfg.data.heldout_fraction, text_field=cfg.data.text_field,
                max_train_tokens=cfg.data.max_site_tokens, what=f"site {site.name!r}")
        blocks = built[site.data]
        if cfg.privacy.enabled:
            ledger = None
            if cfg.privacy.ledger_dir:  # a persistent ledger: verify it, plan on top of it
                ledger = open_ledger(cfg, site, {}, len(blocks.train))
            plans.append(plan_site(
                cfg.privacy, site=site.name, records=len(blocks.train),
                batch_size=cfg.train.batch_size,
                steps=cfg.federation.rounds * cfg.train.local_steps,
                delta=ledger.delta if ledger else None,
                prior=ledger.history if ledger else None))
    general_eval_blocks(cfg)
    for p in plans:
        if p.expected_epsilon > cfg.privacy.target_epsilon:
            log.warning("site %s: σ=%.4f for %d steps would spend ε=%.3f, above its budget "
                        "%g; it will refuse rounds that cross it", p.site, p.noise_multiplier,
                        p.steps, p.expected_epsilon, cfg.privacy.target_epsilon)
        log.info("DP plan · site %-12s σ=%.4f q=%.5f steps=%d δ=%.3g expected ε=%.3f", p.site,
                 p.noise_multiplier, p.sample_rate, p.steps, p.delta, p.expected_epsilon)
    return plans


def backend_config(cfg: RunConfig) -> dict:
    sim = cfg.simulation
    init_args: dict = {}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    else:
        init_args["num_cpus"] = sim.num_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client},
        "init_args": init_args,
    }


def simulate(cfg: RunConfig, run_dir: Path) -> dict:
    """Run ``cfg`` with one simulated SuperNode per site; returns the run summary."""
    preflight(cfg)
    server_app = make_server_app(cfg, run_dir)
    log.info("Simulating %d sites for %d rounds; outputs in %s", len(cfg.sites),
             cfg.federation.rounds, run_dir)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(cfg.sites),
                   backend_config=backend_config(cfg))
    summary = run_dir / "summary.json"
    if not summary.is_file():
        raise FedcptError(f"the simulation ended without a result; see {run_dir}/error.txt "
                          "and the log above")
    import json

    return json.loads(summary.read_text())
