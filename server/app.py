"""Flower ServerApp: set up a run, hand it to the round loop, write the result.

:func:`run_federation` loads the server's model and general data, builds the strategy
and its round protocol (:func:`fedcpt.server.protocols.round_protocol`, once) and the
server steps (:mod:`fedcpt.server.steps`), then
:meth:`~fedcpt.server.run.FederatedRun.run_rounds` runs every round and
:class:`~fedcpt.server.recorder.RunRecorder` writes the run folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedcpt.config import DataConfig, ModelConfig, RunConfig, StrategyConfig, load_config
from fedcpt.core import protocol
from fedcpt.core.adapters import load_adapter, load_version
from fedcpt.core.behaviour import (
    REHEARSAL_PROMPTS,
    answer_batch,
    base_answers,
    load_answers,
    save_answers,
)
from fedcpt.core.continuations import Continuation, continuations, save_continuations
from fedcpt.core.data import spread
from fedcpt.core.general import GeneralCorpus, load_general
from fedcpt.core.model import AdaptedModel, load_adapted_model, load_tokenizer
from fedcpt.core.progress import stream_plain_lines
from fedcpt.core.retention import GeneralEvaluation
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder, new_run_dir
from fedcpt.runfolder.records import Summary
from fedcpt.runfolder.versions import resumable_config
from fedcpt.server.fisher import FisherForSites
from fedcpt.server.protocols import round_protocol
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.reports.tracking import tracking_observers
from fedcpt.server.run import FederatedRun, ServerModel
from fedcpt.server.steps.base import ServerStep, StatefulStep
from fedcpt.server.steps.delta_scaling import DeltaScaling
from fedcpt.server.steps.regression_guard import RegressionGuard
from fedcpt.server.steps.rehearsal import Rehearsal
from fedcpt.server.steps.self_distillation import (
    PhaseTeacher,
    ScoredText,
    SelfDistillation,
    TeacherSamples,
)
from fedcpt.server.steps.server_optimizer import ServerOptimizer

log = logging.getLogger(__name__)

JOB_MARK = "fedcpt job"
"""Logged before each run of a ``jobs`` list (``fedcpt.simulations.runner`` routes the
streamed lines that follow to that run's ``run.log``)."""


@dataclass(frozen=True)
class GeneralData:
    """What the server holds: evaluation blocks per kind that no training ever sees, and a
    rehearsal pool drawn from the in-pool kinds (minus a validation slice for choosing α)
    that server steps may train on."""

    kinds: dict[str, torch.Tensor]
    in_pool: tuple[str, ...]
    rehearsal: torch.Tensor
    validation: torch.Tensor

    @property
    def evaluation(self) -> torch.Tensor:
        """Every kind's evaluation blocks together."""
        return torch.cat(list(self.kinds.values()))


def general_data(cfg: RunConfig) -> GeneralData:
    """The server's general kinds (:func:`fedcpt.core.general.load_general`).

    Cached per process. The simulation's preflight (in the CLI's process) loads it once to
    fail early on a pool too small; the ServerApp, in its own ``flwr-simulation`` process,
    loads it again."""
    return _general_data(cfg.data, cfg.model, cfg.strategy, cfg.train.batch_size)


@functools.lru_cache(maxsize=2)
def _general_corpus(data: DataConfig, model: ModelConfig,
                    validation_blocks: int) -> GeneralCorpus:
    """The general text, tokenised: shared by runs that differ in strategy (compare arms)."""
    return load_general(data, load_tokenizer(model), validation_blocks=validation_blocks)


def _general_data(data: DataConfig, model: ModelConfig, strategy: StrategyConfig,
                  batch_size: int) -> GeneralData:
    n_val = strategy.rehearsal_val_blocks
    corpus = _general_corpus(data, model, n_val)
    needs_pool = (strategy.rehearsal != "none" or strategy.delta_scaling
                  or strategy.distillation in ("pool", "both")
                  or strategy.regression_guard or strategy.anchor == "ewc")
    if needs_pool and len(corpus.pool) < batch_size:
        raise ConfigError(
            f"the general rehearsal pool has {len(corpus.pool)} blocks after {n_val} "
            f"validation blocks, fewer than one batch ({batch_size}); add sources to the "
            "in-pool kinds of data.general_eval (rehearsal_share > 0)")
    return GeneralData(corpus.evaluation, corpus.in_pool, corpus.pool, corpus.validation)


def general_eval_blocks(cfg: RunConfig) -> torch.Tensor:
    """The server's held-out general evaluation blocks (never used for training)."""
    return general_data(cfg).evaluation


def general_evaluation(cfg: RunConfig, lm: AdaptedModel, data: GeneralData,
                       folder: RunFolder, resume: bool) -> GeneralEvaluation:
    """The run's fixed general evaluation. The base model answers the built-in prompts
    once; the answers are kept in the run folder, so a resumed run scores the same ones."""
    if resume and folder.base_answers.is_file():
        return GeneralEvaluation(data.kinds, data.in_pool, load_answers(folder.base_answers),
                                 cfg.train.eval_batch_size, cfg.data.kl_eval_blocks)
    evaluation = GeneralEvaluation.prepare(lm, data.kinds, data.in_pool, cfg.data,
                                           cfg.train.eval_batch_size)
    save_answers(folder.base_answers, evaluation.answers)
    return evaluation


def server_steps(cfg: RunConfig, lm: AdaptedModel | ServerModel, general: GeneralData,
                 version: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
                 ) -> list[ServerStep]:
    """The server optimiser, rehearsal, self-distillation, delta scaling, then the
    regression guard, as configured in ``[strategy]`` (``version``: a committed global
    adapter by round, for the phase teacher).

    The optimiser comes first: its moments follow the federation's own updates, and the
    steps that protect general skill judge the move it proposes. Self-distillation follows
    rehearsal, so it pulls back toward the base whatever rehearsal left."""
    steps: list[ServerStep] = []
    if cfg.strategy.server_optimizer != "none":
        steps.append(ServerOptimizer(cfg.strategy))
    if cfg.strategy.rehearsal != "none":
        steps.append(Rehearsal(lm, general.rehearsal, cfg.train, mode=cfg.strategy.rehearsal,
                               replay_fraction=cfg.strategy.replay_fraction,
                               lr_at=cfg.lr_at, seed=cfg.seed))
    if cfg.strategy.distillation != "none":
        steps.append(self_distillation(cfg, lm, general, version))
    if cfg.strategy.delta_scaling:
        steps.append(DeltaScaling(lm, general.validation, alphas=cfg.strategy.delta_alphas,
                                  tolerance=cfg.strategy.delta_tolerance,
                                  batch_size=cfg.train.eval_batch_size))
    if cfg.strategy.regression_guard:
        steps.append(RegressionGuard(lm, general.validation,
                                     threshold=cfg.strategy.regression_guard,
                                     batch_size=cfg.train.eval_batch_size))
    return steps


def self_distillation(cfg: RunConfig, lm: AdaptedModel | ServerModel, general: GeneralData,
                      version: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
                      ) -> SelfDistillation:
    """The self-distillation step on the pool, the chat answers, both, or the teacher's
    samples. The base model answers :data:`~fedcpt.core.behaviour.REHEARSAL_PROMPTS` here,
    once per process: its greedy answers are deterministic, so a resumed run trains on the
    same ones. The phase teacher reads the adapter a phase began from through ``version``."""
    s = cfg.strategy
    if s.distill_teacher == "phase" and version is None:
        raise ValueError("the phase teacher needs the run's committed versions")
    chat = None
    if s.distillation in ("chat", "both"):
        answers = base_answers(lm, REHEARSAL_PROMPTS, cfg.data.answer_tokens)
        chat = ScoredText(*answer_batch(answers, lm.tokenizer.eos_token_id))
    return SelfDistillation(
        lm, pool=general.rehearsal if s.distillation in ("pool", "both") else None,
        chat=chat, steps=s.distill_steps,
        batch_size=s.distill_batch_size or cfg.train.batch_size, lr=s.distill_lr,
        lr_at=cfg.lr_at, chat_weight=s.distill_chat_weight,
        max_grad_norm=cfg.train.max_grad_norm, seed=cfg.seed,
        from_round=s.distill_from_round,
        phase_teacher=(PhaseTeacher(cfg.phase_of, version)
                       if s.distill_teacher == "phase" else None),
        samples=(TeacherSamples(lm, count=s.distill_samples, tokens=cfg.data.block_size,
                                seed=cfg.seed)
                 if s.distillation == "samples" else None))


def final_continuations(cfg: RunConfig, lm: AdaptedModel,
                        recorder: RunRecorder) -> list[Continuation]:
    """``[report]``'s prompts continued by the base model and by the final global adapter
    (the last round's saved version), kept in ``continuations.json``."""
    if not cfg.report.prompts or not recorder.rows:
        return []
    folder = recorder.folder
    load_adapter(lm.model, load_version(folder.version(recorder.rows[-1].round),
                                        lm.initial_adapter))
    items = continuations(lm, cfg.report.prompts, cfg.report.continuation_tokens)
    save_continuations(folder.continuations, items)
    return items


def with_default_ledger_dir(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """With DP on and no ledger folder configured, simulated sites keep theirs in the run."""
    if not cfg.privacy.enabled or cfg.privacy.ledger_dir:
        return cfg
    ledgers = RunFolder(run_dir).ledgers.resolve()
    privacy = dataclasses.replace(cfg.privacy, ledger_dir=str(ledgers))
    return dataclasses.replace(cfg, privacy=privacy)


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path,
                   resume: bool = False) -> Summary:
    """Run all rounds of ``cfg`` on ``grid`` and write the run folder; returns the summary.

    With ``resume``, continue an interrupted run from its last finished round: the same
    run id (so site ledgers see one run), the saved adapter version, the server steps'
    saved state and the saved sampling RNG. With every site training every round and no
    DP noise, the result matches an uninterrupted run. Under DP, sites asked again for a
    round they paid for resend the stored update (:mod:`fedcpt.client.update_cache`), so
    ledgers match an uninterrupted run's; node ids are random per process, so with
    partial sampling later rounds may pick other sites (a site not asked again keeps the
    spend of the interrupted round: ledgers never lose spend)."""
    cfg = with_default_ledger_dir(cfg, run_dir)
    folder = RunFolder(run_dir)
    rng = random.Random(cfg.seed)
    recorder: RunRecorder | None = None
    try:
        lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
        model = ServerModel(lm)  # what the steps and the Fisher hold: waits for evaluations
        data = general_data(cfg)
        steps = server_steps(cfg, model, data,
                             lambda r, layout: load_version(folder.version(r), layout))
        observers = tracking_observers(cfg, folder)  # none (nothing imported) when off
        if resume:
            recorder, done = RunRecorder.resume(folder, cfg, rng, observers)
            arrays = load_version(folder.version(done), lm.initial_adapter)
            for step in steps:
                if isinstance(step, StatefulStep):
                    step.load_state(folder.version(done))
        else:
            recorder, done = RunRecorder.start(folder, cfg, lm, observers), None
            # Not the cached model's current adapter: it may carry an earlier run's training.
            arrays = (load_version(cfg.federation.initial_adapter, lm.initial_adapter)
                      if cfg.federation.initial_adapter else lm.initial_adapter)
        run = FederatedRun(
            grid=grid, cfg=cfg, protocol=round_protocol(cfg), recorder=recorder, model=model,
            general=general_evaluation(cfg, lm, data, folder, resume), rng=rng, steps=steps,
            config=ConfigRecord({protocol.RUN_CONFIG: cfg.to_json(),
                                 protocol.RUN_ID: recorder.run_id}),
            fisher=(FisherForSites(model, spread(data.rehearsal, cfg.strategy.fisher_blocks))
                    if cfg.strategy.anchor == "ewc" else None))
        run.run_rounds(arrays, done)
        return recorder.finish(run.protocol, final_continuations(cfg, model.use(), recorder))
    except BaseException as err:
        folder.mark_failed(err)
        if recorder is not None:
            recorder.fail(err)
        raise


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config names a scenario plus overrides, or
    ``resume`` names an interrupted run folder to continue.

    Secure aggregation is on unless the config turns it off (``secagg.mode = off``)."""
    stream_plain_lines()
    rc = context.run_config
    if str(rc.get("jobs", "")):  # from `fedcpt simulate`/`compare`: validated, exact folders
        jobs = json.loads(Path(str(rc["jobs"])).read_text(encoding="utf-8"))
        for i, job in enumerate(jobs, 1):  # one after another, on this one engine start
            log.info("%s %d of %d: %s", JOB_MARK, i, len(jobs), job["run_dir"])
            run_federation(grid, RunConfig.from_json(job["config"]), Path(job["run_dir"]))
        return
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
