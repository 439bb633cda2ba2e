"""Flower ServerApp: run federated continual pretraining and record every round.

One round: sample sites → each trains the global LoRA adapter on its own text
(:mod:`fedcpt.client.app`) → :class:`~fedcpt.strategies.fedavg.AdapterFedAvg` validates
and averages the returned adapters → sites report held-out domain loss → the server
measures held-out general loss → :class:`~fedcpt.server.recorder.RunRecorder` saves the
adapter version and metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shlex
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedcpt.client.app import RUN_CONFIG_KEY, RUN_ID_KEY
from fedcpt.config import RunConfig, load_config
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.core.data import build_blocks, spread
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import load_adapted_model, load_tokenizer
from fedcpt.exceptions import ConfigError
from fedcpt.server.recorder import RunRecorder
from fedcpt.strategies.fedavg import AdapterFedAvg

log = logging.getLogger(__name__)


def general_eval_blocks(cfg: RunConfig) -> torch.Tensor:
    """The server's held-out general evaluation blocks (never used for training)."""
    blocks = build_blocks(
        cfg.data.general, load_tokenizer(cfg.model), block_size=cfg.data.block_size,
        heldout_fraction=cfg.data.heldout_fraction, text_field=cfg.data.text_field,
        what="general data",
    )
    return spread(blocks.heldout, cfg.data.general_eval_blocks)


def build_strategy(cfg: RunConfig, recorder: RunRecorder) -> AdapterFedAvg:
    """FedAvg sampling ``sites_per_round`` of the registered sites (0: all)."""
    fed, n_sites = cfg.federation, len(cfg.sites)
    n_train = fed.sites_per_round or n_sites
    n_eval = fed.eval_sites_per_round or n_sites
    return AdapterFedAvg(
        min_sites=fed.min_sites,
        listener=recorder,
        fraction_train=n_train / n_sites,
        fraction_evaluate=n_eval / n_sites,
        min_train_nodes=n_train,
        min_evaluate_nodes=n_eval,
        min_available_nodes=max(n_train, n_eval),
    )


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path) -> dict:
    """Run all rounds of ``cfg`` on ``grid`` and write the run folder; returns the summary."""
    if cfg.privacy.enabled and not cfg.privacy.ledger_dir:
        privacy = dataclasses.replace(cfg.privacy, ledger_dir=str(run_dir / "ledgers"))
        cfg = dataclasses.replace(cfg, privacy=privacy)
    recorder = RunRecorder(run_dir, cfg)
    try:
        random.seed(cfg.seed)  # Flower samples sites with the `random` module
        lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
        general = general_eval_blocks(cfg)
        recorder.start(lm)
        initial = to_arrays(adapter_state(lm.model))

        def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            load_adapter(lm.model, arrays)
            result = evaluate_blocks(lm, general, cfg.train.eval_batch_size)
            recorder.on_global(server_round, result, lm)
            return MetricRecord({"general-loss": result.loss, "general-ece": result.ece})

        config = ConfigRecord({RUN_CONFIG_KEY: cfg.to_json(), RUN_ID_KEY: run_dir.name})
        strategy = build_strategy(cfg, recorder)
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=cfg.federation.rounds,
            timeout=cfg.federation.round_timeout_s, train_config=config,
            evaluate_config=ConfigRecord(dict(config)), evaluate_fn=evaluate_global,
        )
        return recorder.finish()
    except BaseException as err:
        recorder.fail(err)
        raise


def new_run_dir(root: str | Path, name: str, exact: str | Path | None = None) -> Path:
    """``exact`` if given, else ``<root>/<name>-<timestamp>``; never a non-empty folder."""
    path = Path(exact) if exact else Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"output folder {path} already exists and is not empty")
    return path


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config names a scenario plus overrides."""
    rc = context.run_config
    cfg = load_config(
        scenario=str(rc.get("scenario", "")) or None,
        config_file=str(rc.get("config-file", "")) or None,
        overrides=shlex.split(str(rc.get("set", ""))),
    )
    run_federation(grid, cfg, new_run_dir(str(rc.get("out-dir", "runs")), cfg.name))


def make_server_app(cfg: RunConfig, run_dir: Path) -> ServerApp:
    """A ServerApp bound to an already-validated config (used by ``fedcpt simulate``)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir)

    return server
