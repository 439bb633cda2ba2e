"""fedcpt's round loop, top to bottom: sample → configure → send → collect and validate →
retry policy → aggregate → server steps → evaluate → commit.

Flower is the transport (the Grid's ``send_and_receive``) and the engine that runs the
ServerApp and ClientApps. The run (:class:`~fedcpt.server.run.FederatedRun`) drives the
rounds; its round protocol (:mod:`fedcpt.server.protocols`: plain FedAvg, SecAgg+, either
wrapped in site-level DP), chosen once, carries what a mechanism adds. A round, in order:

1. **sample** ``sites_per_round`` nodes (a phase samples among its own sites);
2. **configure** the request: the global adapter and config, plus what the protocol adds
   (the clipping norm under site-level DP), the round's Fisher under EWC and the phase's
   starting adapter under the phase anchor;
3. **send** it through the protocol and wait up to ``round_timeout_s`` (under SecAgg+,
   stages 1–2, keys and shares, run first and each request carries its site's shares);
4. **collect and validate** the replies with the strategy
   (:meth:`~fedcpt.strategies.base.Aggregator.validate`); a bad reply is a named failure;
5. **retry policy**: with fewer than ``min_sites`` valid updates the round is sent again
   (``round_retries``), then stops the run or keeps the previous adapter (``failed_round``);
6. **aggregate** the accepted records as the protocol does (SecAgg+ first unmasks their
   sum; site-level DP adds the server's noise);
7. **server steps** (optimiser, rehearsal, self-distillation, delta scaling, regression
   guard) in order; a step may reject the round;
8. **evaluate** the new global adapter at the sites through the protocol (under SecAgg+
   a session of its own, :mod:`~fedcpt.server.secure_eval`) while the server evaluates it
   on its general text, in a thread (every ``federation.eval_every`` rounds, and always
   each phase's last round and the run's last);
9. **commit** (:class:`~fedcpt.server.run.Committer`): the adapter version and the
   checkpoint ``--resume`` uses; then, once the general evaluation is in (by default
   during the next round's training), the **drift** check (:mod:`~fedcpt.server.drift`; a
   threshold that rolls back makes the next round wait for it) and the metrics line.

The message-level helpers (sampling, requests, reading replies) close the module.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcpt.core import progress
from fedcpt.core import protocol as p
from fedcpt.core.adapters import arrays_digest
from fedcpt.exceptions import RoundFailed, UpdateRejected
from fedcpt.server.steps.base import ServerStep
from fedcpt.strategies.base import (
    Aggregator,
    SiteEvalReport,
    SiteTrainReport,
    contribution,
    eval_report,
    site_name,
)

if TYPE_CHECKING:
    from fedcpt.server.run import FederatedRun

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One send of a round's training: the aggregate (None: not aggregated) and why."""

    aggregate: ArrayRecord | None
    collected: Collected
    failures: list[str]


def run_round(run: FederatedRun, server_round: int, global_arrays: ArrayRecord,
              pool: list[int] | None = None) -> ArrayRecord:
    """One round from ``global_arrays``; returns the next global adapter."""
    fed_cfg = run.cfg.federation
    content = configure(run, server_round, global_arrays)
    run.recorder.record_sent(server_round, arrays_digest(global_arrays))
    failures: list[str] = []
    for attempt_no in range(fed_cfg.round_retries + 1):
        if attempt_no:
            log.warning("round %d: not aggregated; sending the round again (retry %d of %d)",
                        server_round, attempt_no, fed_cfg.round_retries)
        attempt = train_attempt(run, server_round, global_arrays, content, pool)
        failures += [f"attempt {attempt_no + 1}: {f}" if fed_cfg.round_retries else f
                     for f in attempt.failures]
        if attempt.aggregate is not None:
            break
    run.model.settle()  # the last round's metrics line before this round's records
    reports = attempt.collected.reports
    if attempt.aggregate is None:
        run.recorder.record_train(server_round, reports, failures, aggregated=False)
        if fed_cfg.failed_round == "stop":
            raise RoundFailed(
                f"round {server_round} was not aggregated after {fed_cfg.round_retries} "
                f"retries: {'; '.join(failures[-3:])}. Fix the sites and continue with "
                "--resume, or set federation.failed_round = \"skip\"")
        log.warning("round %d: not aggregated; the global adapter is unchanged", server_round)
        new_arrays = global_arrays
    else:
        examples = sum(r.num_examples for r in reports)
        new_arrays, accepted, details = apply_steps(run.steps, server_round, global_arrays,
                                                    attempt.aggregate, examples)
        run.recorder.record_train(server_round, reports, failures, accepted, details)
    general = None
    if run.cfg.evaluates(server_round):  # federation.eval_every
        general = run.committer.evaluate(run, new_arrays)  # runs while the sites evaluate
        evaluate_sites(run, server_round, new_arrays)
    moved = new_arrays is not global_arrays
    return run.committer.commit(run, server_round, new_arrays, general,
                                global_arrays if moved else None)


def configure(run: FederatedRun, server_round: int, global_arrays: ArrayRecord) -> RecordDict:
    """The round's training request (the same for every attempt and site): what the
    protocol adds, the round's Fisher under EWC (the server's model computes it, once its
    pending evaluation is in) and the phase's starting adapter under the phase anchor."""
    extra = {}
    if run.fisher:
        extra[p.FISHER] = run.fisher(server_round, global_arrays)
    if run.cfg.strategy.anchor == "phase":  # set by run_rounds before every round
        extra[p.ANCHOR] = run.phase_start
    return request(global_arrays, run.protocol.configure(run.config), server_round, extra)


def train_attempt(run: FederatedRun, server_round: int, global_arrays: ArrayRecord,
                  content: RecordDict, pool: list[int] | None) -> Attempt:
    """Sample, then the protocol's send, collect and validate, aggregate: one attempt."""
    n_train = run.cfg.federation.sites_per_round or (
        len(run.cfg.sites) if pool is None else len(pool))
    nodes = sample_nodes(run.grid, n_train, run.rng, pool)
    progress.emit("round", round=server_round, state="training", sites=len(nodes))
    return run.protocol.train(run.exchange(server_round), global_arrays, content, nodes)


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


def emit_sites(server_round: int, collected: Collected) -> None:
    """Each sampled site's outcome as a progress line (the live view's rows)."""
    for report in collected.reports:
        progress.emit("site", round=server_round, site=report.site, state="done",
                      loss=report.train_loss)
    for failure in collected.failures:
        progress.emit("site", round=server_round, site=failure.split(":", 1)[0],
                      state="failed")


def evaluate_sites(run: FederatedRun, server_round: int, arrays: ArrayRecord) -> None:
    """Record every (or ``eval_sites_per_round``) site's held-out domain loss of ``arrays``."""
    run.recorder.record_evaluate(server_round, site_evaluations(run, server_round, arrays))


def site_evaluations(run: FederatedRun, server_round: int,
                     arrays: ArrayRecord) -> list[SiteEvalReport]:
    """The evaluating sites' reports, as the protocol carries them: one per site, or under
    SecAgg+ one aggregate of their sum."""
    progress.emit("round", round=server_round, state="evaluating")
    n_eval = run.cfg.federation.eval_sites_per_round or len(run.cfg.sites)
    nodes = sample_nodes(run.grid, n_eval, run.rng)
    content = request(arrays, run.config, server_round)
    return run.protocol.evaluate(run.exchange(server_round), content, nodes)


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

