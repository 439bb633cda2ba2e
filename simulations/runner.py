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
from fedcpt.config import RunConfig
from fedcpt.core.data import build_blocks
from fedcpt.core.model import load_tokenizer
from fedcpt.exceptions import FedcptError
from fedcpt.server.app import general_eval_blocks, make_server_app

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig) -> None:
    """Load the tokenizer (fetching the model if needed) and every data source once."""
    tokenizer = load_tokenizer(cfg.model)
    for site in cfg.sites:
        build_blocks(site.data, tokenizer, block_size=cfg.data.block_size,
                     heldout_fraction=cfg.data.heldout_fraction, text_field=cfg.data.text_field,
                     max_train_tokens=cfg.data.max_site_tokens, what=f"site {site.name!r}")
    general_eval_blocks(cfg)


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
