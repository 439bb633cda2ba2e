"""Records a run round by round into its folder: site results, then a commit per round in
two steps (the adapter version, server-step state and checkpoint; then, once the server's
general evaluation is in, the metrics line and provenance), then the summary and report.
A run that fails leaves ``error.txt`` instead."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord

from fedcpt.config import RunConfig
from fedcpt.core.adapters import load_version
from fedcpt.core.continuations import Continuation
from fedcpt.core.durable import write_json
from fedcpt.core.model import AdaptedModel
from fedcpt.core.retention import GeneralReport
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.provenance import read_run_id, version_provenance, write_manifest
from fedcpt.runfolder.records import (
    RoundRecord,
    Summary,
    append_round,
    read_rounds,
    weighted_mean,
    write_rounds,
    write_summary,
)
from fedcpt.server.checkpoint import PendingGeneral, RunState, TrainOutcome, encode_random
from fedcpt.server.drift import Drift, check_data_drift
from fedcpt.server.reports.report import write_report
from fedcpt.server.reports.summary import build_summary
from fedcpt.server.reports.tracking import RunObserver, final_version, notify_all
from fedcpt.server.steps.base import StatefulStep
from fedcpt.strategies.base import SiteEvalReport, SiteTrainReport

if TYPE_CHECKING:
    from fedcpt.server.protocols.base import RoundProtocol

log = logging.getLogger(__name__)


class RunRecorder:
    """Collects per-site and global results round by round and writes the run folder."""

    def __init__(self, folder: RunFolder, cfg: RunConfig, state: RunState,
                 rows: list[RoundRecord] | None = None,
                 observers: Sequence[RunObserver] = ()) -> None:
        self.folder = folder
        self.observers = list(observers)  # experiment trackers (server/reports/tracking.py)
        self.cfg = cfg
        self.state = state
        self.rows = list(rows or [])
        self.drift: dict[int, Drift] = {}
        self.data_flags: dict[int, list[str]] = {}
        self.sent: dict[int, str] = {}  # SHA-256 of the global adapter sent each round
        self._random_state: list = []  # the sampling RNG's, when the last version was saved

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @classmethod
    def start(cls, folder: RunFolder, cfg: RunConfig, lm: AdaptedModel,
              observers: Sequence[RunObserver] = ()) -> RunRecorder:
        """A new run: a fresh id (ledgers tell runs apart by it, whatever the folder is
        called), the folder and its manifest; then the ``observers`` are told it started
        (a tracker that cannot start fails the run before its first round)."""
        state = RunState(run_id=uuid.uuid4().hex, full_model_bytes=lm.base_param_bytes)
        folder.adapters.mkdir(parents=True, exist_ok=True)
        write_manifest(folder, cfg, state.run_id, state.started)
        folder.metrics.write_text("", encoding="utf-8")
        recorder = cls(folder, cfg, state, observers=observers)
        for observer in recorder.observers:
            observer.run_started(state.run_id)
        return recorder

    @classmethod
    def resume(cls, folder: RunFolder, cfg: RunConfig, rng: random.Random,
               observers: Sequence[RunObserver] = ()) -> tuple[RunRecorder, int]:
        """The recorder of an interrupted run, and the last round it finished.

        Restores the sampling ``rng`` and drops metrics lines past the checkpoint (a round
        that died half-way is run again; so is the last round's line when its general
        evaluation is pending: the resumed run evaluates it again)."""
        state, last, phase = RunState.load(folder, read_run_id(folder), rng)
        rows = read_rounds(folder, last if state.pending is None else last - 1)
        write_rounds(folder, rows)
        folder.error.unlink(missing_ok=True)
        log.info("resuming %s after round %d of %d (phase %d)", folder.root, last,
                 cfg.federation.rounds, phase + 1)
        recorder = cls(folder, cfg, state, rows, observers)
        for observer in recorder.observers:
            observer.run_started(state.run_id)
        recorder._random_state = encode_random(rng)
        if state.pending is not None:
            recorder.sent[last] = state.pending.sent
            recorder.data_flags[last] = list(state.pending.data_flags)
        return recorder, last

    def record_sent(self, server_round: int, global_sha256: str) -> None:
        """The digest of the global adapter the round's training request carried (what the
        sites' attestations are bound to)."""
        self.sent[server_round] = global_sha256

    def record_train(self, server_round: int, reports: list[SiteTrainReport],
                     failures: list[str], aggregated: bool,
                     steps: dict[str, dict[str, Any]] | None = None) -> None:
        """A round's training: accepted sites, failures, whether the global moved, and
        what each server step did."""
        self.state.train[server_round] = TrainOutcome(list(reports), list(failures), aggregated)
        if steps:
            self.state.steps[server_round] = steps
        for r in reports:
            loss = "n/a (DP)" if r.train_loss is None else f"{r.train_loss:.4f}"
            norm = "masked" if r.update_norm is None else f"{r.update_norm:.3f}"
            log.info("round %d · site %-12s train loss %s · %d examples · %.1fs · "
                     "update norm %s", server_round, r.site, loss, r.num_examples,
                     r.seconds, norm)

    def record_evaluate(self, server_round: int, reports: list[SiteEvalReport]) -> None:
        """The round's site evaluations (per site, or one secure sum over several), and a
        flag for each site whose data drift passes the monitor's threshold."""
        self.state.evals[server_round] = list(reports)
        for r in reports:
            if r.summed_sites:
                log.info("round %d · %s (secure aggregation): domain loss %.4f (base "
                         "%.4f) over %d tokens, %d values clipped", server_round, r.site,
                         r.loss, r.base_loss, r.tokens, r.clipped)
                continue
            self.state.domain_base.setdefault(r.site, r.base_loss)
            drift = "" if r.data_drift is None else f", data drift {r.data_drift:+.4f}"
            log.info("round %d · site %-12s domain loss %.4f (base %.4f%s)", server_round,
                     r.site, r.loss, r.base_loss, drift)
        self.data_flags[server_round] = check_data_drift(
            self.cfg.monitor, self.rows,
            {r.site: r.data_drift for r in reports if r.data_drift is not None})

    def record_drift(self, server_round: int, drift: Drift) -> None:
        """The drift monitor's verdict on the round (a rollback un-aggregates it)."""
        self.drift[server_round] = drift

    def _round_record(self, server_round: int, report: GeneralReport | None) -> RoundRecord:
        outcome = self.state.train.get(server_round, TrainOutcome([], [], False))
        drift = self.drift.get(server_round)
        train, evals = outcome.reports, self.state.evals.get(server_round, [])
        general = report.overall if report else None
        answers = report.answers if report else None
        return RoundRecord(
            round=server_round,
            phase=self.cfg.phase_of(server_round).name,
            evaluated=report is not None,
            general_loss=general.loss if general else None,
            general_per_kind={k: r.loss for k, r in report.kinds.items()} if report else {},
            general_kl_to_base=general.kl_to_base if general else None,
            answer_loss=answers.loss if answers else None,
            answer_exact_match=answers.exact_match if answers else None,
            general_perplexity=general.perplexity if general else None,
            general_ece=general.ece if general else None,
            domain_loss=weighted_mean([(r.loss, r.tokens) for r in evals]),
            domain_per_site={r.site: r.loss for r in evals if not r.summed_sites},
            domain_ece=weighted_mean([(r.ece, r.tokens) for r in evals]),
            data_drift_per_site={r.site: r.data_drift for r in evals
                                 if r.data_drift is not None},
            data_drift_flags=self.data_flags.get(server_round, []),
            aggregated=outcome.aggregated and not (drift and drift.rolled_back_to is not None),
            sites_trained=[r.site for r in train],
            train_loss=weighted_mean([(r.train_loss, r.num_examples) for r in train
                                      if r.train_loss is not None]),
            update_norm_per_site={r.site: r.update_norm for r in train
                                  if r.update_norm is not None},
            bytes_up_per_client=sum(r.bytes_up for r in train) // len(train) if train else 0,
            failures=outcome.failures,
            server_steps=self.state.steps.get(server_round, {}),
            elapsed_s=time.time() - self.state.started,
            update_norm=drift.update_norm if drift else None,
            drift=drift.to_dict() if drift else {},
            domain_secure=next(({"sites": r.summed_sites, "tokens": r.tokens, "loss": r.loss,
                                 "base_loss": r.base_loss, "ece": r.ece,
                                 "clipped": r.clipped}
                                for r in evals if r.summed_sites), None),
        )

    def save_version(self, server_round: int, lm: AdaptedModel,
                     stateful: Sequence[StatefulStep], rng: random.Random,
                     update_norm: float | None) -> None:
        """A round's durable half: the global adapter in ``lm`` as the round's version, the
        server steps' state, then the checkpoint (with ``rng`` as it is now), which marks the
        round's general evaluation pending. The next round may be sent from here on."""
        version = self.folder.version(server_round)
        lm.model.save_pretrained(str(version))
        for step in stateful:
            step.save_state(version)
        self.state.pending = PendingGeneral(server_round, update_norm,
                                            self.data_flags.get(server_round, []),
                                            self.sent.get(server_round, ""))
        self._random_state = encode_random(rng)
        self._save_checkpoint(server_round)

    def load_version(self, server_round: int, reference: ArrayRecord) -> ArrayRecord:
        """The global adapter saved as ``server_round``'s version (``reference``: its layout)."""
        return load_version(self.folder.version(server_round), reference)

    def record_general(self, general: GeneralReport | None) -> RoundRecord:
        """The pending round's general evaluation (None: a round ``federation.eval_every``
        leaves unevaluated): its metrics line and the version's provenance, then the
        checkpoint without the pending mark."""
        if self.state.pending is None:
            raise RuntimeError("record_general: no saved version awaits its evaluation")
        server_round = self.state.pending.round
        if general is not None:
            self.state.general[server_round] = general
        record = self._round_record(server_round, general)
        reports = self.state.train.get(server_round, TrainOutcome([], [], False)).reports
        write_json(self.folder.provenance(server_round), version_provenance(
            self.folder, self.cfg, self.run_id, record, self.sent.get(server_round, ""),
            {r.site: r.attestation for r in reports}))
        self.rows.append(record)
        append_round(self.folder, record)
        notify_all(self.observers, "round_recorded", record)
        self.state.pending = None
        self._save_checkpoint(server_round)
        if general is None:
            log.info("round %d · not evaluated (federation.eval_every = %d) · %.0fs "
                     "elapsed", server_round, self.cfg.federation.eval_every,
                     record.elapsed_s)
            return record
        domain = "n/a" if record.domain_loss is None else f"{record.domain_loss:.4f}"
        kl = general.overall.kl_to_base
        log.info("round %d · global: general loss %.4f · KL to base %s · domain loss %s · "
                 "%.0fs elapsed", server_round, general.overall.loss,
                 "n/a" if kl is None else f"{kl:.4f}", domain, record.elapsed_s)
        return record

    def _save_checkpoint(self, server_round: int) -> None:
        self.state.save(self.folder, server_round, self.cfg.phase_of(server_round).index,
                        self._random_state)

    def fail(self, error: BaseException) -> None:
        """Tell the observers the run failed (the folder's ``error.txt`` is the record)."""
        notify_all(self.observers, "run_failed", error)

    def finish(self, protocol: RoundProtocol,
               continuations: list[Continuation] | None = None) -> Summary:
        """Write report.md and report.html (with the final adapter's ``continuations``
        and the round ``protocol``'s section), then summary.json (last: it marks the run
        finished)."""
        summary = build_summary(self.cfg, self.state, self.rows, protocol.summary)
        write_report(self.folder, summary, self.rows, self.state.domain_base, self.cfg,
                     continuations or [], mechanism=protocol.report_lines(summary),
                     upload_form=protocol.upload_form(self.cfg))
        write_summary(self.folder, summary)
        notify_all(self.observers, "run_finished", summary,
                   final_version(self.folder, self.rows))
        log.info("run finished: forgetting %+.4f nats, adaptation %+.4f nats; report: %s",
                 summary.forgetting, summary.adaptation or float("nan"), self.folder.report)
        return summary
