"""The run's one owner of state on the server: :class:`FederatedRun` holds the rounds'
shared state, runs them from the start or from a resumed round, and commits each through
an injected :class:`Committer`; :class:`ServerModel` is the server's model as a handle
that waits for the pending general evaluation before any use.

Committing a round: the server's general evaluation of its version, the drift check, then
the record (version and checkpoint; then metrics line and provenance). The general
evaluation needs only the server's model and text, so it runs in a thread of its own
(:class:`GeneralRun`) while the sites evaluate the round. With
``federation.overlap_general_eval`` it also runs on while they train the next round: the
version and checkpoint are saved first (a resumed run evaluates a version whose evaluation
did not finish), and the evaluation is left pending on the :class:`ServerModel`, whose next
use (the next round's server steps, its EWC Fisher, the next evaluation, the end of the
run) records it first. A drift monitor that may roll back a round needs its general loss
before the next round trains from it, so with one the next round always waits.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedcpt.config import Phase, RunConfig
from fedcpt.core import progress
from fedcpt.core.adapters import load_adapter, update_norm
from fedcpt.core.model import AdaptedModel
from fedcpt.core.retention import GeneralEvaluation, GeneralReport
from fedcpt.server.drift import check_drift
from fedcpt.server.phases import PhaseStarts, discover_sites, phase_nodes
from fedcpt.server.protocols.base import Exchange, RoundProtocol
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.round_loop import run_round
from fedcpt.server.steps.base import ServerStep, StatefulStep

log = logging.getLogger(__name__)


class GeneralRun:
    """The server's general evaluation of the adapter loaded in ``lm``, in a thread (the
    forward passes release the GIL, so the round loop goes on meanwhile)."""

    def __init__(self, general: GeneralEvaluation, lm: AdaptedModel) -> None:
        self._report: GeneralReport | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(general, lm), daemon=True,
                                        name="general-evaluation")
        self._thread.start()

    def _run(self, general: GeneralEvaluation, lm: AdaptedModel) -> None:
        try:
            self._report = general.evaluate(lm)
        except BaseException as err:  # re-raised in the round loop by result()
            self._error = err

    def result(self) -> GeneralReport:
        """The report, once the evaluation finished (its error, if it failed)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._report is not None
        return self._report


class ServerModel:
    """The server's model, shared by a general evaluation left running (:meth:`defer`) and
    everything else: every use waits for that evaluation and records it first.

    The server steps and the EWC Fisher hold this handle as their model: reading any of its
    attributes (``model``, ``device``, ``autocast`` …) is a use, so none of them can train
    or load an adapter while the evaluation still reads the weights."""

    def __init__(self, lm: AdaptedModel | None) -> None:
        self._lm = lm
        self._pending: tuple[GeneralRun, Callable[[GeneralReport], None]] | None = None

    def use(self) -> AdaptedModel:
        """The model, once no evaluation of it is pending (that one recorded first)."""
        self.settle()
        assert self._lm is not None, "this run has no server model"
        return self._lm

    def settle(self) -> None:
        """Wait for the pending evaluation, if any, and record it."""
        if self._pending is not None:
            general, then = self._pending
            self._pending = None
            then(general.result())

    def evaluate(self, general: GeneralEvaluation, arrays: ArrayRecord) -> GeneralRun:
        """Load ``arrays`` and start their general evaluation (it reads the model: keep it
        until :meth:`defer` or its result)."""
        lm = self.load(arrays)
        return GeneralRun(general, lm)

    def load(self, arrays: ArrayRecord) -> AdaptedModel:
        """The model with ``arrays`` as its adapter."""
        lm = self.use()
        load_adapter(lm.model, arrays)
        return lm

    def defer(self, general: GeneralRun, then: Callable[[GeneralReport], None]) -> None:
        """Leave ``general`` running; the next use waits for it and calls ``then``."""
        assert self._pending is None
        self._pending = (general, then)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not the model's: copy and pickle ask for these
            raise AttributeError(name)
        return getattr(self.use(), name)


def overlaps(cfg: RunConfig) -> bool:
    """Whether a round's general evaluation may run on into the next round's training:
    asked for, and no drift alarm that rolls back."""
    monitor = cfg.monitor
    rolls_back = monitor.action == "rollback" and bool(
        monitor.update_drift or monitor.general_loss_drift)
    return cfg.federation.overlap_general_eval and not rolls_back


class Committer:
    """Evaluates and records each round's version in the run folder (tests inject a fake
    that only lists the rounds committed)."""

    def evaluate(self, run: FederatedRun, arrays: ArrayRecord) -> GeneralRun | None:
        """Start the server's general evaluation of ``arrays``."""
        return run.model.evaluate(run.general, arrays)

    def commit(self, run: FederatedRun, server_round: int, arrays: ArrayRecord,
               general: GeneralRun | None, previous: ArrayRecord | None = None,
               ) -> ArrayRecord:
        """Record ``arrays`` as the round's version while ``general`` evaluates it (None:
        a round ``federation.eval_every`` leaves unevaluated); for a round that moved the
        global adapter from ``previous``, check drift (a flagged round may roll back to the
        last good version). Returns the round's version."""
        norm = None if previous is None else update_norm(arrays, previous)
        stateful = [s for s in run.steps if isinstance(s, StatefulStep)]
        if general is None:
            return self._commit_unevaluated(run, server_round, arrays, norm, stateful)
        if overlaps(run.cfg):  # recorded by the model's next use, once the evaluation is in
            # the model is read, not changed, beside the evaluation reading it
            run.recorder.save_version(server_round, run.model.use(), stateful, run.rng, norm)
            run.model.defer(general, lambda report: self._settled(run, report))
            return arrays
        report = general.result()
        if norm is not None:
            drift = check_drift(run.cfg.monitor, run.recorder.rows, norm, report.overall.loss)
            run.recorder.record_drift(server_round, drift)
            if drift.rolled_back_to is not None:
                arrays = run.recorder.load_version(drift.rolled_back_to, arrays)
                report = run.model.evaluate(run.general, arrays).result()
        run.recorder.save_version(server_round, run.model.use(), stateful, run.rng, norm)
        _record(run, report)
        return arrays

    def _commit_unevaluated(self, run: FederatedRun, server_round: int, arrays: ArrayRecord,
                            norm: float | None, stateful: list[StatefulStep]) -> ArrayRecord:
        """Save and record a round with no evaluation: the drift check sees its update norm
        only."""
        if norm is not None:
            drift = check_drift(run.cfg.monitor, run.recorder.rows, norm, None)
            run.recorder.record_drift(server_round, drift)
            if drift.rolled_back_to is not None:
                arrays = run.recorder.load_version(drift.rolled_back_to, arrays)
        lm = run.model.load(arrays)  # the version saved is the one in the model
        run.recorder.save_version(server_round, lm, stateful, run.rng, norm)
        _record(run, None)
        return arrays

    def resume_pending(self, run: FederatedRun, arrays: ArrayRecord) -> None:
        """Evaluate again the saved version whose evaluation was lost with the run."""
        general = self.evaluate(run, arrays)
        if general is not None:
            run.model.defer(general, lambda report: self._settled(run, report))

    @staticmethod
    def _settled(run: FederatedRun, report: GeneralReport) -> None:
        """Record the round whose general evaluation was pending, once it is in."""
        pending = run.recorder.state.pending
        if pending.update_norm is not None:  # the saved version stands: overlaps() rules
            # out a rollback, and a resumed synchronous commit saved the version it rolled
            # back to
            run.recorder.record_drift(pending.round, check_drift(
                run.cfg.monitor, run.recorder.rows, pending.update_norm, report.overall.loss))
        _record(run, report)


def _record(run: FederatedRun, report: GeneralReport | None) -> None:
    record = run.recorder.record_general(report)
    progress.emit("round", round=record.round, state="done", general_loss=record.general_loss)


@dataclass
class FederatedRun:
    """One run on the server: everything its rounds share, and the rounds themselves."""

    grid: Grid
    cfg: RunConfig
    protocol: RoundProtocol
    """The round mechanism, chosen once (:func:`fedcpt.server.protocols.round_protocol`)."""
    recorder: RunRecorder
    model: ServerModel
    """The server's model: evaluates the global adapter and saves its versions."""
    general: GeneralEvaluation
    """General text in kinds no training sees, and the base model's answers."""
    config: ConfigRecord
    """What every request carries: the run config and the run id."""
    rng: random.Random
    """Samples the sites; saved in every checkpoint."""
    steps: list[ServerStep] = field(default_factory=list)
    fisher: Callable[[int, ArrayRecord], ArrayRecord] | None = None
    """The EWC Fisher for the sites (:class:`~fedcpt.server.fisher.FisherForSites`), or None."""
    committer: Committer = field(default_factory=Committer)
    phase_start: ArrayRecord | None = None
    """The global adapter the current phase began from (``strategy.anchor = "phase"``)."""
    phase_starts: PhaseStarts = field(init=False)
    sites: dict[int, str] | None = None
    """Node → site name, asked of the nodes once a phase trains on some of them."""

    def __post_init__(self) -> None:
        # resumed inside a phase: the version committed before it, read when first needed
        self.phase_starts = PhaseStarts(lambda r, layout: self.recorder.load_version(r, layout))

    def exchange(self, server_round: int) -> Exchange:
        """How the round's protocol reaches the sites."""
        fed = self.cfg.federation
        return Exchange(self.grid, server_round, fed.round_timeout_s, fed.min_sites)

    def run_rounds(self, arrays: ArrayRecord, done: int | None = None) -> ArrayRecord:
        """Rounds ``done + 1`` … ``federation.rounds`` from the global adapter ``arrays``,
        the version committed after round ``done`` (None: a new run, whose starting adapter
        is evaluated and committed as round 0 first)."""
        if done is None:
            self.committer.commit(self, 0, arrays, self.committer.evaluate(self, arrays))
            done = 0
        elif self.recorder.state.pending is not None:  # saved, its evaluation lost
            self.committer.resume_pending(self, arrays)
            if not overlaps(self.cfg):
                self.model.settle()
        for server_round in range(done + 1, self.cfg.federation.rounds + 1):
            phase = self.cfg.phase_of(server_round)
            if server_round in (done + 1, phase.first_round):
                log.info("phase %d (%s): rounds %d-%d, sites %s", phase.index + 1,
                         phase.name, server_round, phase.last_round, ", ".join(phase.sites))
            if self.cfg.strategy.anchor == "phase":
                self.phase_start = self.phase_starts.at(phase, server_round, arrays)
            arrays = run_round(self, server_round, arrays, self.training_pool(phase))
        self.model.settle()
        return arrays

    def training_pool(self, phase: Phase) -> list[int] | None:
        """The nodes a phase trains on (None: every node)."""
        if set(phase.sites) == {s.name for s in self.cfg.sites}:
            return None
        if self.sites is None:
            self.sites = discover_sites(self.grid, len(self.cfg.sites), self.config,
                                        self.cfg.federation.round_timeout_s)
        return phase_nodes(self.sites, phase.sites, phase.name)
