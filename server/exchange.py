"""The message-level pieces of a round: sample nodes, build the requests, read the replies.

Flower's Grid is the transport (``send_and_receive``); what is sent and what a reply must
hold are fedcpt's, decided here and in :mod:`fedcpt.strategies`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.strategies.base import (
    Aggregator,
    SiteEvalReport,
    SiteTrainReport,
    contribution,
    eval_report,
    site_name,
)

log = logging.getLogger(__name__)


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
    return reports


TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE
