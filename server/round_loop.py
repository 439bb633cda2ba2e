"""fedcpt's round loop, top to bottom: sample → configure → send → collect and validate →
retry policy → aggregate → server steps → evaluate → commit.

Flower is the transport (the Grid's ``send_and_receive``) and the engine that runs the
ServerApp and ClientApps; every policy of a round is here, in the order it happens:

1. **sample** ``sites_per_round`` nodes (a phase samples among its own sites);
2. **configure** the request: the global adapter and config, plus the clipping norm
   under site-level DP, the round's Fisher under EWC and the phase's starting adapter
   under the phase anchor; under secure aggregation, SecAgg+ stages 1–2 (keys, shares)
   run first and each request carries its site's shares;
3. **send** it and wait up to ``round_timeout_s``;
4. **collect and validate** the replies with the strategy
   (:meth:`~fedcpt.strategies.base.Aggregator.validate`); a bad reply is a named failure;
5. **retry policy**: with fewer than ``min_sites`` valid updates the round is sent again
   (``round_retries``), then stops the run or keeps the previous adapter (``failed_round``);
6. **aggregate** the accepted records (SecAgg+ stage 4 first unmasks their sum) and, under
   site-level DP, add the server's noise;
7. **server steps** (optimiser, rehearsal, self-distillation, delta scaling, regression
   guard) in order; a step may reject the round;
8. **evaluate** the new global adapter at the sites (domain; under secure aggregation
   through a SecAgg+ session of its own, :mod:`~fedcpt.server.secure_eval`) while the
   server evaluates it on its general text, in a thread (every ``federation.eval_every``
   rounds, and always each phase's last round and the run's last);
9. **commit** (:mod:`~fedcpt.server.commit`): the adapter version and the checkpoint
   ``--resume`` uses; then, once the general evaluation is in (by default during the
   next round's training), the **drift** check (:mod:`~fedcpt.server.drift`; a
   threshold that rolls back makes the next round wait for it) and the metrics line.

The message-level helpers (sampling, requests, reading replies) close the module.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcpt.config import Phase, RunConfig
from fedcpt.core import progress
from fedcpt.core import protocol as p
from fedcpt.core.adapters import arrays_digest, load_version
from fedcpt.core.model import AdaptedModel
from fedcpt.core.retention import GeneralEvaluation
from fedcpt.exceptions import RoundFailed, UpdateRejected
from fedcpt.privacy.secagg.server import SecAggFailed, SecAggRound
from fedcpt.privacy.user_level import add_site_noise, clipping_config
from fedcpt.server.commit import GeneralRun, commit, overlaps, settle, start_general
from fedcpt.server.fisher import FisherForSites
from fedcpt.server.phases import discover_sites, phase_nodes
from fedcpt.server.recorder import RunRecorder
from fedcpt.server.secure_eval import evaluate_securely
from fedcpt.server.steps.base import ServerStep
from fedcpt.strategies.base import (
    Aggregator,
    SiteEvalReport,
    SiteTrainReport,
    contribution,
    eval_report,
    site_name,
)
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Everything the rounds of one run share."""

    grid: Grid
    cfg: RunConfig
    aggregator: Aggregator
    recorder: RunRecorder
    lm: AdaptedModel
    """The server's model: evaluates the global adapter and saves its versions."""
    general: GeneralEvaluation
    """General text in kinds no training sees, and the base model's answers."""
    config: ConfigRecord
    """What every request carries: the run config and the run id."""
    rng: random.Random
    """Samples the sites; saved in every checkpoint."""
    steps: list[ServerStep] = field(default_factory=list)
    fisher: FisherForSites | None = None
    phase_start: ArrayRecord | None = None
    """The global adapter the current phase began from (``strategy.anchor = "phase"``)."""
    general_run: GeneralRun | None = None
    """The general evaluation of the last saved version, while it runs (see :func:`settle`)."""
    _sites: dict[int, str] | None = None

    def training_pool(self, phase: Phase) -> list[int] | None:
        """The nodes a phase trains on (None: every node)."""
        if set(phase.sites) == {s.name for s in self.cfg.sites}:
            return None
        if self._sites is None:
            self._sites = discover_sites(self.grid, len(self.cfg.sites), self.config,
                                         self.cfg.federation.round_timeout_s)
        return phase_nodes(self._sites, phase.sites, phase.name)


@dataclass
class Attempt:
    """One send of a round's training: the aggregate (None: not aggregated) and why."""

    aggregate: ArrayRecord | None
    collected: Collected
    failures: list[str]


def run_rounds(fed: Federation, arrays: ArrayRecord, done: int | None = None) -> ArrayRecord:
    """Rounds ``done + 1`` … ``federation.rounds`` from the global adapter ``arrays``, the
    version committed after round ``done`` (None: a new run, whose starting adapter is
    evaluated and committed as round 0 first)."""
    if done is None:
        commit(fed, 0, arrays, start_general(fed, arrays))
        done = 0
    elif fed.recorder.state.pending is not None:  # saved, its evaluation lost with the run
        fed.general_run = start_general(fed, arrays)
        if not overlaps(fed.cfg):
            settle(fed)
    for server_round in range(done + 1, fed.cfg.federation.rounds + 1):
        phase = fed.cfg.phase_of(server_round)
        if server_round in (done + 1, phase.first_round):
            log.info("phase %d (%s): rounds %d-%d, sites %s", phase.index + 1, phase.name,
                     server_round, phase.last_round, ", ".join(phase.sites))
        if fed.cfg.strategy.anchor == "phase":
            fed.phase_start = phase_start(fed, phase, server_round, arrays)
        arrays = run_round(fed, server_round, arrays, fed.training_pool(phase))
    settle(fed)
    return arrays


def phase_start(fed: Federation, phase: Phase, server_round: int,
                arrays: ArrayRecord) -> ArrayRecord:
    """The adapter ``phase`` began from: ``arrays`` at its first round; later, the one kept
    (or, in a run resumed inside the phase, the version committed before its first round)."""
    if server_round == phase.first_round:
        return arrays
    if fed.phase_start is None:
        return load_version(fed.recorder.folder.version(phase.first_round - 1), arrays)
    return fed.phase_start


def run_round(fed: Federation, server_round: int, global_arrays: ArrayRecord,
              pool: list[int] | None = None) -> ArrayRecord:
    """One round from ``global_arrays``; returns the next global adapter."""
    fed_cfg = fed.cfg.federation
    content = configure(fed, server_round, global_arrays)
    fed.recorder.record_sent(server_round, arrays_digest(global_arrays))
    failures: list[str] = []
    for attempt_no in range(fed_cfg.round_retries + 1):
        if attempt_no:
            log.warning("round %d: not aggregated; sending the round again (retry %d of %d)",
                        server_round, attempt_no, fed_cfg.round_retries)
        attempt = train_attempt(fed, server_round, global_arrays, content, pool)
        failures += [f"attempt {attempt_no + 1}: {f}" if fed_cfg.round_retries else f
                     for f in attempt.failures]
        if attempt.aggregate is not None:
            break
    settle(fed)  # the last round's general evaluation, before the server model is used
    reports = attempt.collected.reports
    if attempt.aggregate is None:
        fed.recorder.record_train(server_round, reports, failures, aggregated=False)
        if fed_cfg.failed_round == "stop":
            raise RoundFailed(
                f"round {server_round} was not aggregated after {fed_cfg.round_retries} "
                f"retries: {'; '.join(failures[-3:])}. Fix the sites and continue with "
                "--resume, or set federation.failed_round = \"skip\"")
        log.warning("round %d: not aggregated; the global adapter is unchanged", server_round)
        new_arrays = global_arrays
    else:
        examples = sum(r.num_examples for r in reports)
        new_arrays, accepted, details = apply_steps(fed.steps, server_round, global_arrays,
                                                    attempt.aggregate, examples)
        fed.recorder.record_train(server_round, reports, failures, accepted, details)
    general = None
    if fed.cfg.evaluates(server_round):  # federation.eval_every
        general = start_general(fed, new_arrays)  # runs while the sites evaluate
        evaluate_sites(fed, server_round, new_arrays)
    moved = new_arrays is not global_arrays
    return commit(fed, server_round, new_arrays, general, global_arrays if moved else None)


def configure(fed: Federation, server_round: int, global_arrays: ArrayRecord) -> RecordDict:
    """The round's training request (the same for every attempt and site)."""
    config = fed.config
    if fed.cfg.privacy.user_level:
        config = clipping_config(config, fed.cfg.privacy)
    extra = {}
    if fed.fisher:  # computed on the server's model: once its evaluation is done
        settle(fed)
        extra[p.FISHER] = fed.fisher(server_round, global_arrays)
    if fed.cfg.strategy.anchor == "phase":  # set by run_rounds before every round
        extra[p.ANCHOR] = fed.phase_start
    return request(global_arrays, config, server_round, extra)


def train_attempt(fed: Federation, server_round: int, global_arrays: ArrayRecord,
                  content: RecordDict, pool: list[int] | None) -> Attempt:
    """Sample, send, collect and validate, aggregate: one attempt at a round."""
    aggregator, timeout = fed.aggregator, fed.cfg.federation.round_timeout_s
    n_train = fed.cfg.federation.sites_per_round or (
        len(fed.cfg.sites) if pool is None else len(pool))
    nodes = sample_nodes(fed.grid, n_train, fed.rng, pool)
    progress.emit("round", round=server_round, state="training", sites=len(nodes))
    failures: list[str] = []
    secagg: SecAggRound | None = None
    if isinstance(aggregator, SecAggFedAvg):  # SecAgg+ stages 1–2 before training
        secagg, shares = _share_keys(aggregator, fed.grid, nodes, server_round, timeout,
                                     content, failures)
        messages = [aggregator.training_message(content, n, s) for n, s in shares.items()]
        nodes = list(shares)
    else:
        messages = messages_to(nodes, content, MessageType.TRAIN)
    replies = fed.grid.send_and_receive(messages, timeout=timeout) if messages else []
    collected = collect_train(server_round, replies, set(nodes), aggregator, global_arrays)
    _emit_sites(server_round, collected)
    failures += collected.failures
    if len(collected.accepted) < fed.cfg.federation.min_sites:
        failures.append(f"{len(collected.accepted)} valid updates, fewer than "
                        f"min_sites={fed.cfg.federation.min_sites}")
        return Attempt(None, collected, failures)
    # (under SecAgg the sites' noise is sized for the fewest survivors it may unmask)
    if fed.cfg.privacy.user_level and secagg is None and collected.errors:
        # As Flower's DP wrapper: the noise is sized for every sampled site's update.
        failures.append("site-level DP: a sampled site failed; the round is not released")
        return Attempt(None, collected, failures)
    records = list(collected.accepted.values())
    try:
        if secagg is not None:  # SecAgg+ stages 4–5: only the sum is unmasked
            records = [SecAggFedAvg.unmask(secagg, collected.accepted)]
        aggregate = aggregator.aggregate(records, global_arrays)
    except (SecAggFailed, UpdateRejected) as err:
        failures += secagg.failures if secagg else []
        failures.append(f"secure aggregation: {err}" if secagg and isinstance(
            err, UpdateRejected) else str(err))
        log.warning("round %d: %s; the global adapter is unchanged", server_round, err)
        return Attempt(None, collected, failures)
    failures += secagg.failures if secagg else []
    if fed.cfg.privacy.user_level and secagg is None:  # under SecAgg the sites added it
        # Calibrated to the updates actually averaged: a silent or rejected site shrinks
        # n, and the noise on the mean (σ·C/n) grows with it.
        aggregate = add_site_noise(aggregate, fed.cfg.privacy, len(records))
    return Attempt(aggregate, collected, failures)


def _share_keys(aggregator: SecAggFedAvg, grid: Grid, nodes: list[int], server_round: int,
                timeout: float, content: RecordDict, failures: list[str],
                ) -> tuple[SecAggRound, dict[int, ConfigRecord]]:
    """SecAgg+ stages 1–2: per site still present, its inbound shares (none if the stages
    failed: then no site trains this attempt, and ``failures`` say why)."""
    secagg = aggregator.open_round(grid, nodes, server_round, timeout, content)
    try:
        shares = secagg.share_keys()
    except SecAggFailed as err:
        log.warning("round %d: %s", server_round, err)
        shares = {}
        secagg.failures.append(str(err))
    failures += secagg.failures
    secagg.failures.clear()
    return secagg, shares


def apply_steps(steps: list[ServerStep], server_round: int, global_arrays: ArrayRecord,
                aggregate: ArrayRecord, examples: int,
                ) -> tuple[ArrayRecord, bool, dict[str, dict[str, Any]]]:
    """The server steps in order: the next global adapter, whether the round was
    accepted, and what each step did."""
    arrays, details = aggregate, {}
    for step in steps:
        result = step.apply(server_round, global_arrays, arrays, examples)
        details[step.name] = result.details
        if result.rejects_round:
            return global_arrays, False, details
        arrays = result.arrays
    return arrays, True, details


def _emit_sites(server_round: int, collected: Collected) -> None:
    """Each sampled site's outcome as a progress line (the live view's rows)."""
    for report in collected.reports:
        progress.emit("site", round=server_round, site=report.site, state="done",
                      loss=report.train_loss)
    for failure in collected.failures:
        progress.emit("site", round=server_round, site=failure.split(":", 1)[0],
                      state="failed")


def evaluate_sites(fed: Federation, server_round: int, arrays: ArrayRecord) -> None:
    """Record every (or ``eval_sites_per_round``) site's held-out domain loss of ``arrays``."""
    fed.recorder.record_evaluate(server_round, site_evaluations(fed, server_round, arrays))


def site_evaluations(fed: Federation, server_round: int,
                     arrays: ArrayRecord) -> list[SiteEvalReport]:
    """The evaluating sites' reports: one per site, or under SecAgg+ one aggregate of
    their sum (:func:`~fedcpt.server.secure_eval.evaluate_securely`)."""
    progress.emit("round", round=server_round, state="evaluating")
    n_eval = fed.cfg.federation.eval_sites_per_round or len(fed.cfg.sites)
    nodes = sample_nodes(fed.grid, n_eval, fed.rng)
    content = request(arrays, fed.config, server_round)
    timeout = fed.cfg.federation.round_timeout_s
    if isinstance(fed.aggregator, SecAggFedAvg):
        return evaluate_securely(fed.aggregator, fed.grid, nodes, server_round, content,
                                 timeout)
    replies = fed.grid.send_and_receive(messages_to(nodes, content, MessageType.EVALUATE),
                                        timeout=timeout)
    return collect_evaluate(server_round, replies)


# --- the message-level pieces: sample, build requests, read replies --------------------

def sample_nodes(grid: Grid, size: int, rng: random.Random,
                 pool: Iterable[int] | None = None) -> list[int]:
    """``size`` nodes drawn with ``rng`` from ``pool`` (default: every connected node),
    once that many are connected."""
    wanted = None if pool is None else set(pool)
    while len(nodes := sorted(n for n in grid.get_node_ids()
                              if wanted is None or n in wanted)) < size:
        log.info("waiting for sites to connect: %d of %d", len(nodes), size)
        time.sleep(1)
    return rng.sample(nodes, size)


def request(arrays: ArrayRecord, config: ConfigRecord, server_round: int,
            extra: dict[str, ArrayRecord] | None = None) -> RecordDict:
    """What the sampled sites get: the global adapter and the config with the round."""
    config = ConfigRecord({**dict(config), p.SERVER_ROUND: server_round})
    return RecordDict({p.ARRAYS: arrays, p.CONFIG: config, **(extra or {})})


def messages_to(nodes: Iterable[int], content: RecordDict, message_type: str) -> list[Message]:
    return [Message(content=content, dst_node_id=node, message_type=message_type)
            for node in nodes]


@dataclass
class Collected:
    """The training replies of one attempt, checked."""

    accepted: dict[int, RecordDict] = field(default_factory=dict)
    """Node → the canonical record of its valid update (what enters the aggregate)."""
    reports: list[SiteTrainReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    errors: int = 0
    """Replies that were errors (a site that failed or refused)."""


def collect_train(server_round: int, replies: Iterable[Message], sampled: set[int],
                  aggregator: Aggregator, reference: ArrayRecord) -> Collected:
    """Validate every training reply; each failure is named, none is fatal."""
    out = Collected()
    replied: set[int] = set()
    for msg in replies:
        node, site = msg.metadata.src_node_id, site_name(msg)
        replied.add(node)
        if msg.has_error():
            out.errors += 1
            out.failures.append(f"{site}: {msg.error.reason}")
            log.warning("round %d: site %s failed: %s", server_round, site, msg.error.reason)
            continue
        try:
            payload, report = aggregator.validate(msg, reference)
        except UpdateRejected as err:
            out.failures.append(f"{site}: update rejected: {err}")
            log.warning("round %d: rejected update from site %s: %s", server_round, site, err)
            continue
        out.accepted[node] = contribution(aggregator.payload_key, payload, report.num_examples)
        out.reports.append(report)
    for node in sorted(sampled - replied):
        out.failures.append(f"node-{node}: no reply within the round timeout")
        log.warning("round %d: node %d did not reply in time", server_round, node)
    # Replies arrive in the order the sites finish, and a float sum depends on its order:
    # the updates are aggregated (and reported) in site-name order instead, so the same
    # seed gives the same adapter, bit for bit (node ids only break ties: Flower draws them
    # at random in a simulation).
    ranked = sorted(zip(out.accepted.items(), out.reports, strict=True),
                    key=lambda pair: (pair[1].site, pair[0][0]))
    out.accepted = dict(item for item, _ in ranked)
    out.reports = [report for _, report in ranked]
    return out


def collect_evaluate(server_round: int, replies: Iterable[Message]) -> list[SiteEvalReport]:
    """The sites' evaluation reports; a failed or incomplete one is logged and skipped."""
    reports = []
    for msg in replies:
        try:
            reports.append(eval_report(msg))
        except UpdateRejected as err:
            log.warning("round %d: evaluation failed at site %s: %s", server_round,
                        site_name(msg), err)
    return sorted(reports, key=lambda report: report.site)  # as collect_train's order

