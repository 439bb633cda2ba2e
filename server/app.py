"""Flower ServerApp: run federated continual pretraining and record every round.

One round: sample sites → each trains the global LoRA adapter on its own text
(:mod:`fedcpt.client.app`) → :class:`~fedcpt.strategies.fedavg.AdapterFedAvg` validates
and averages the returned adapters → sites report held-out domain loss → the server
measures held-out general loss → :class:`~fedcpt.server.recorder.RunRecorder` saves the
adapter version and metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedcpt.config import DataConfig, ModelConfig, RunConfig, StrategyConfig, load_config
from fedcpt.core import protocol
from fedcpt.core.adapters import load_adapter, load_version
from fedcpt.core.data import load_blocks, spread
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, load_adapted_model, load_tokenizer
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.user_level import wrap_user_level
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.versions import resumable_config
from fedcpt.strategies.delta_scaling import DeltaScaling
from fedcpt.strategies.ewc import FisherToSites
from fedcpt.strategies.fedavg import AdapterFedAvg
from fedcpt.strategies.phase_training import PhaseTraining, discover_sites, phase_nodes
from fedcpt.strategies.regression_guard import RegressionGuard
from fedcpt.strategies.rehearsal import Rehearsal
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg
from fedcpt.strategies.server_optimizer import ServerOptimizer
from fedcpt.strategies.server_step import ServerStep
from fedcpt.strategies.stateful import StatefulStep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneralData:
    """What the server holds: an evaluation set no training ever sees, and a rehearsal
    pool (minus a validation slice for choosing α) that server steps may train on."""

    evaluation: torch.Tensor
    rehearsal: torch.Tensor
    validation: torch.Tensor


def general_data(cfg: RunConfig) -> GeneralData:
    """Split the server's general sources by document hash (held-out → evaluation).

    Cached per process: the simulation's preflight and the ServerApp share one process."""
    return _general_data(cfg.data, cfg.model, cfg.strategy, cfg.train.batch_size)


@functools.lru_cache(maxsize=2)
def _general_data(data: DataConfig, model: ModelConfig, strategy: StrategyConfig,
                  batch_size: int) -> GeneralData:
    blocks = load_blocks(data.general, load_tokenizer(model), data, what="general data",
                         max_train_tokens=0)
    n_val = strategy.rehearsal_val_blocks
    pool, validation = blocks.train[n_val:], blocks.train[:n_val]
    needs_pool = (strategy.rehearsal != "none" or strategy.delta_scaling
                  or strategy.regression_guard or strategy.anchor == "ewc")
    if needs_pool and len(pool) < batch_size:
        raise ConfigError(
            f"the general rehearsal pool has {len(pool)} blocks after {n_val} validation "
            f"blocks, fewer than one batch ({batch_size}); add data.general sources")
    return GeneralData(spread(blocks.heldout, data.general_eval_blocks), pool, validation)


def general_eval_blocks(cfg: RunConfig) -> torch.Tensor:
    """The server's held-out general evaluation blocks (never used for training)."""
    return general_data(cfg).evaluation


def server_steps(cfg: RunConfig, lm: AdaptedModel, general: GeneralData) -> list[ServerStep]:
    """The server optimiser, rehearsal, delta scaling, then the regression guard, as
    configured in ``[strategy]``.

    The optimiser comes first: its moments follow the federation's own updates, and the
    steps that protect general skill judge the move it proposes."""
    steps: list[ServerStep] = []
    if cfg.strategy.server_optimizer != "none":
        steps.append(ServerOptimizer(cfg.strategy))
    if cfg.strategy.rehearsal != "none":
        steps.append(Rehearsal(lm, general.rehearsal, cfg.train, mode=cfg.strategy.rehearsal,
                               replay_fraction=cfg.strategy.replay_fraction,
                               lr_at=cfg.lr_at, seed=cfg.seed))
    if cfg.strategy.delta_scaling:
        steps.append(DeltaScaling(lm, general.validation, alphas=cfg.strategy.delta_alphas,
                                  tolerance=cfg.strategy.delta_tolerance,
                                  batch_size=cfg.train.eval_batch_size))
    if cfg.strategy.regression_guard:
        steps.append(RegressionGuard(lm, general.validation,
                                     threshold=cfg.strategy.regression_guard,
                                     batch_size=cfg.train.eval_batch_size))
    return steps


def build_strategy(cfg: RunConfig, recorder: RunRecorder,
                   steps: list[ServerStep] | None = None, round_offset: int = 0,
                   train_nodes: list[int] | None = None,
                   ewc: tuple[AdaptedModel, torch.Tensor] | None = None) -> Strategy:
    """FedAvg sampling ``sites_per_round`` of the registered sites (0: all), with secure
    aggregation when ``secagg`` is on, or wrapped in Flower's DP-FedAvg when site-level
    DP is on. With ``train_nodes`` (a phase's sites) only those train; every site is still
    evaluated. With ``ewc`` (the server's model and general blocks) training instructions
    carry the round's diagonal Fisher."""
    fed, n_sites = cfg.federation, len(cfg.sites)
    n_pool = n_sites if train_nodes is None else len(train_nodes)
    n_train = fed.sites_per_round or n_pool
    n_eval = fed.eval_sites_per_round or n_sites
    secure = {"cfg": cfg} if cfg.secagg.enabled else {}
    strategy = (SecAggFedAvg if secure else AdapterFedAvg)(
        **secure,
        min_sites=fed.min_sites,
        round_timeout=fed.round_timeout_s,
        round_retries=fed.round_retries,
        stop_on_failed_round=fed.failed_round == "stop",
        listener=recorder,
        server_steps=steps,
        max_update_norm=fed.max_update_norm,
        round_offset=round_offset,
        max_examples=cfg.train.local_steps * cfg.train.batch_size,
        fraction_train=n_train / n_pool,
        fraction_evaluate=n_eval / n_sites,
        min_train_nodes=n_train,
        min_evaluate_nodes=n_eval,
        # evaluation still waits for its n_eval nodes; a phase's training waits for its own
        min_available_nodes=max(n_train, n_eval) if train_nodes is None else n_train,
    )
    wrapped: Strategy = strategy
    if cfg.privacy.user_level and not secure:  # under SecAgg the sites add the noise
        wrapped = wrap_user_level(strategy, cfg.privacy, n_train)
    if ewc is not None:
        wrapped = FisherToSites(wrapped, *ewc)
    if train_nodes is not None:
        wrapped = PhaseTraining(wrapped, train_nodes)
    return wrapped


def with_default_ledger_dir(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """With DP on and no ledger folder configured, simulated sites keep theirs in the run."""
    if not cfg.privacy.enabled or cfg.privacy.ledger_dir:
        return cfg
    privacy = dataclasses.replace(cfg.privacy, ledger_dir=str((run_dir / "ledgers").resolve()))
    return dataclasses.replace(cfg, privacy=privacy)


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run all rounds of ``cfg`` on ``grid`` and write the run folder; returns the summary.

    With ``resume``, continue an interrupted run from its last finished round: the same
    run id (so site ledgers see one run), the saved adapter version, and the saved
    sampling RNG. With every site training every round and no DP noise, the result
    matches an uninterrupted run. Under DP, sites asked again for a round they paid for
    resend the stored update (:mod:`fedcpt.client.update_cache`), so ledgers match an
    uninterrupted run's; Flower samples among node ids that are random per process, so
    with partial sampling later rounds may pick other sites (a site not asked again keeps
    the spend of the interrupted round: ledgers never lose spend)."""
    cfg = with_default_ledger_dir(cfg, run_dir)
    if resume:
        recorder, done = RunRecorder.resume(run_dir, cfg)
    else:
        # ledgers tell runs apart by the id, whatever the folder is called
        recorder, done = RunRecorder(run_dir, cfg, uuid.uuid4().hex), 0
        random.seed(cfg.seed)  # Flower samples sites with the `random` module
    try:
        lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
        recorder.adapter_size = sum(a.numpy().size for a in lm.initial_adapter.values())
        data = general_data(cfg)
        general = data.evaluation
        if resume:
            initial = load_version(run_dir / "adapters" / f"round-{done:03d}",
                                   lm.initial_adapter)
        else:
            recorder.start(lm)
            # Not the cached model's current adapter: it may carry an earlier run's training.
            initial = (load_version(cfg.federation.initial_adapter, lm.initial_adapter)
                       if cfg.federation.initial_adapter else lm.initial_adapter)

        def evaluate_global(offset: int, server_round: int,
                            arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and (resume or offset):
                return None  # this version was evaluated already (earlier phase or process)
            load_adapter(lm.model, arrays)
            result = evaluate_blocks(lm, general, cfg.train.eval_batch_size)
            recorder.on_global(server_round + offset, result, lm)
            return MetricRecord({"general-loss": result.loss, "general-ece": result.ece})

        config = ConfigRecord({protocol.RUN_CONFIG: cfg.to_json(),
                               protocol.RUN_ID: recorder.run_id})
        steps = server_steps(cfg, lm, data)
        recorder.stateful = [s for s in steps if isinstance(s, StatefulStep)]
        if resume:
            for step in recorder.stateful:
                step.load_state(run_dir / "adapters" / f"round-{done:03d}")
        ewc = ((lm, spread(data.rehearsal, cfg.strategy.fisher_blocks))
               if cfg.strategy.anchor == "ewc" else None)
        arrays = initial
        directory: dict[int, str] | None = None
        all_sites = {s.name for s in cfg.sites}
        for phase in cfg.phase_plan():
            if phase.last_round <= done:
                continue
            offset = max(done, phase.first_round - 1)
            train_nodes = None
            if set(phase.sites) != all_sites:
                directory = directory or discover_sites(
                    grid, len(cfg.sites), config, cfg.federation.round_timeout_s)
                train_nodes = phase_nodes(directory, phase.sites, phase.name)
            log.info("phase %d (%s): rounds %d-%d, sites %s", phase.index + 1, phase.name,
                     offset + 1, phase.last_round, ", ".join(phase.sites))
            result = build_strategy(cfg, recorder, steps, offset, train_nodes, ewc).start(
                grid=grid, initial_arrays=arrays, num_rounds=phase.last_round - offset,
                timeout=cfg.federation.round_timeout_s, train_config=config,
                evaluate_config=ConfigRecord(dict(config)),
                evaluate_fn=functools.partial(evaluate_global, offset),
            )
            if len(result.arrays):  # empty when no round of the phase was aggregated
                arrays = result.arrays
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
    """Entry point for ``flwr run``: the run config names a scenario plus overrides, or
    ``resume`` names an interrupted run folder to continue.

    Secure aggregation is on unless the config turns it off (``secagg.mode = off``)."""
    rc = context.run_config
    if str(rc.get("resume", "")):
        run_dir = Path(str(rc["resume"]))
        run_federation(grid, resumable_config(run_dir), run_dir, resume=True)
        return
    cfg = load_config(
        scenario=str(rc.get("scenario", "")) or None,
        config_file=str(rc.get("config-file", "")) or None,
        overrides=shlex.split(str(rc.get("set", ""))),
    ).with_secagg_resolved(deployment=True)
    run_federation(grid, cfg, new_run_dir(str(rc.get("out-dir", "runs")), cfg.name))


def make_server_app(cfg: RunConfig, run_dir: Path, resume: bool = False) -> ServerApp:
    """A ServerApp bound to an already-validated config (used by ``fedcpt simulate``)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir, resume)

    return server
