"""Commit a round: the server's general evaluation of its version, the drift check, then
the record (version and checkpoint; then metrics line and provenance).

The general evaluation needs only the server's model and text, so it runs in a thread
of its own (:class:`GeneralRun`) while the sites evaluate the round. With
``federation.overlap_general_eval`` it also runs on while they train the next round:
the version and checkpoint are saved first (a resumed run evaluates a version whose
evaluation did not finish), and :func:`settle` records the result before the server's
model is used again (the next round's server steps, its EWC Fisher, the end of the run).
A drift monitor that may roll back a round needs its general loss before the next round
trains from it, so with one the next round always waits.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

from fedcpt.config import RunConfig
from fedcpt.core import progress
from fedcpt.core.adapters import load_adapter, load_version, update_norm
from fedcpt.core.model import AdaptedModel
from fedcpt.core.retention import GeneralEvaluation, GeneralReport
from fedcpt.server.drift import check_drift
from fedcpt.server.steps.base import StatefulStep

if TYPE_CHECKING:
    from fedcpt.server.round_loop import Federation


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


def overlaps(cfg: RunConfig) -> bool:
    """Whether a round's general evaluation may run on into the next round's training:
    asked for, and no drift alarm that rolls back."""
    monitor = cfg.monitor
    rolls_back = monitor.action == "rollback" and bool(
        monitor.update_drift or monitor.general_loss_drift)
    return cfg.federation.overlap_general_eval and not rolls_back


def start_general(fed: Federation, arrays: ArrayRecord) -> GeneralRun:
    """Load ``arrays`` into the server's model and start its general evaluation."""
    load_adapter(fed.lm.model, arrays)
    return GeneralRun(fed.general, fed.lm)


def commit(fed: Federation, server_round: int, arrays: ArrayRecord,
           general: GeneralRun | None, previous: ArrayRecord | None = None) -> ArrayRecord:
    """Record ``arrays`` as the round's version while ``general`` evaluates it (None: a
    round ``federation.eval_every`` leaves unevaluated); for a round that moved the global
    adapter from ``previous``, check drift (a flagged round may roll back to the last good
    version). Returns the round's version."""
    norm = None if previous is None else update_norm(arrays, previous)
    stateful = [s for s in fed.steps if isinstance(s, StatefulStep)]
    if general is None:
        return _commit_unevaluated(fed, server_round, arrays, norm, stateful)
    if overlaps(fed.cfg):  # recorded by settle(), once the evaluation is in
        fed.recorder.save_version(server_round, fed.lm, stateful, fed.rng, norm)
        fed.general_run = general
        return arrays
    report = general.result()
    if norm is not None:
        drift = check_drift(fed.cfg.monitor, fed.recorder.rows, norm, report.overall.loss)
        fed.recorder.record_drift(server_round, drift)
        if drift.rolled_back_to is not None:
            arrays = load_version(fed.recorder.folder.version(drift.rolled_back_to), arrays)
            report = start_general(fed, arrays).result()
    fed.recorder.save_version(server_round, fed.lm, stateful, fed.rng, norm)
    _record(fed, report)
    return arrays


def _commit_unevaluated(fed: Federation, server_round: int, arrays: ArrayRecord,
                        norm: float | None, stateful: list[StatefulStep]) -> ArrayRecord:
    """Save and record a round with no evaluation: the drift check sees its update norm
    only. The server's model is free (the round loop settled the last evaluation)."""
    if norm is not None:
        drift = check_drift(fed.cfg.monitor, fed.recorder.rows, norm, None)
        fed.recorder.record_drift(server_round, drift)
        if drift.rolled_back_to is not None:
            arrays = load_version(fed.recorder.folder.version(drift.rolled_back_to), arrays)
    load_adapter(fed.lm.model, arrays)  # the version saved is the one in the model
    fed.recorder.save_version(server_round, fed.lm, stateful, fed.rng, norm)
    _record(fed, None)
    return arrays


def settle(fed: Federation) -> None:
    """Record the round whose general evaluation is still running, once it is in."""
    if fed.general_run is None:
        return
    run, fed.general_run = fed.general_run, None
    report = run.result()
    pending = fed.recorder.state.pending
    if pending.update_norm is not None:  # the saved version stands: overlaps() rules out
        # a rollback, and a resumed synchronous commit saved the version it rolled back to
        fed.recorder.record_drift(pending.round, check_drift(
            fed.cfg.monitor, fed.recorder.rows, pending.update_norm, report.overall.loss))
    _record(fed, report)


def _record(fed: Federation, report: GeneralReport | None) -> None:
    record = fed.recorder.record_general(report)
    progress.emit("round", round=record.round, state="done", general_loss=record.general_loss)
