"""The round's site evaluation under SecAgg+: the server learns only the sum over sites.

When ``secagg.mode`` is on, every evaluating site answers through the masked stage,
whatever its ``eval-release`` (``plain`` and ``noised`` allow strictly more; ``nothing``
refuses and drops out of the sum). The session reuses the round's SecAgg+ machinery in
its own round context, bound to the ``evaluate`` purpose
(:class:`~fedcpt.privacy.secagg.context.RoundContext`), so no key, signature or share of
the round's training session serves it, and the sites keep its secrets apart:

1–2. keys and shares over the evaluating nodes (``evaluate.secagg_setup``,
     ``evaluate.secagg_share_keys``);
3.   the masked evaluation request (``evaluate.secagg_masked``): the global adapter, the
     config and the site's inbound shares; the reply is the fixed-point vector of
     :mod:`fedcpt.privacy.secagg.eval_sum`, masked;
4–5. consistency and unmasking → the sum, decoded to token-weighted means.

The round records one aggregate entry (:class:`~fedcpt.strategies.base.SiteEvalReport`
with ``summed_sites``): no per-site value exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.context import EVALUATE
from fedcpt.privacy.secagg.eval_sum import VECTOR_LENGTH, EvalSum, decode_evaluation
from fedcpt.privacy.secagg.server import STATE, SecAggFailed, stage_types
from fedcpt.strategies.base import SiteEvalReport, site_name
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg

log = logging.getLogger(__name__)

EVAL_MASKED = stage_types(EVALUATE)[2]  # "evaluate.secagg_masked"


def evaluate_securely(aggregator: SecAggFedAvg, grid: Grid, nodes: list[int],
                      server_round: int, content: RecordDict,
                      timeout: float) -> list[SiteEvalReport]:
    """The sampled ``nodes``' evaluation of ``content``'s adapter as one aggregate report
    (none if the session failed: too few sites, or a sum that cannot be decoded)."""
    secagg = aggregator.open_round(grid, nodes, server_round, timeout, content, EVALUATE)
    try:
        shares = secagg.share_keys()
        messages = [Message(RecordDict({**dict(content.items()), STATE: record}),
                            dst_node_id=node, message_type=EVAL_MASKED)
                    for node, record in shares.items()]
        masked = collect_masked(server_round, grid.send_and_receive(messages, timeout=timeout),
                                set(shares))
        total, contributors = secagg.unmask(masked)
        result = decode_evaluation(total, contributors)
    except (SecAggFailed, UpdateRejected) as err:
        log.warning("round %d: secure evaluation not released: %s", server_round, err)
        return []
    finally:
        for failure in secagg.failures:
            log.warning("round %d: secure evaluation: %s", server_round, failure)
    return [aggregate_report(result)]


def aggregate_report(result: EvalSum) -> SiteEvalReport:
    """The round's evaluation entry for a secure sum (``site`` names no single site)."""
    return SiteEvalReport(site=f"secure sum of {result.sites} sites", tokens=result.tokens,
                          loss=result.loss, base_loss=result.base_loss, ece=result.ece,
                          summed_sites=result.sites, clipped=result.clipped)


def collect_masked(server_round: int, replies: Iterable[Message],
                   asked: set[int]) -> dict[int, np.ndarray]:
    """Node → its masked evaluation vector, for the well-formed replies; any other reply
    is logged and the site counts as dropped (its mask key is rebuilt at unmasking)."""
    masked: dict[int, np.ndarray] = {}
    for msg in replies:
        node, site = msg.metadata.src_node_id, site_name(msg)
        if node not in asked:
            continue
        if msg.has_error():
            log.warning("round %d: evaluation failed at site %s: %s", server_round, site,
                        msg.error.reason)
            continue
        record = msg.content.array_records.get(p.MASKED)
        vector = record[p.MASKED_VECTOR].numpy() if record and p.MASKED_VECTOR in record \
            else None
        if vector is None or vector.dtype != np.uint32 or vector.shape != (VECTOR_LENGTH,):
            log.warning("round %d: site %s sent no uint32[%d] masked evaluation", server_round,
                        site, VECTOR_LENGTH)
            continue
        masked[node] = vector
    return masked
