"""The strategy interface: validate one site's reply, aggregate the accepted ones.

A strategy is pure aggregation, records in and a record out (as Flower's
``aggregate_arrayrecords``); sampling, sending, retries, server steps and recording are
the round loop's (:mod:`fedcpt.server.round_loop`). Also here: what a round reports
about each site, and the reply checks every strategy shares.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.attestation import Attestation

TRAIN_METRICS = (p.NUM_EXAMPLES, p.TRAIN_SECONDS)
EVAL_METRICS = (p.NUM_EXAMPLES, p.DOMAIN_LOSS, p.DOMAIN_BASE_LOSS, p.DOMAIN_ECE)


@dataclass(frozen=True)
class SiteTrainReport:
    """One site's accepted training reply."""

    site: str
    num_examples: int
    train_loss: float | None
    """Mean local training loss; None under DP (it is computed on protected records)."""
    seconds: float
    bytes_up: int
    update_norm: float | None
    """L2 distance from the global adapter; None under secure aggregation (the server
    never sees a single update)."""
    unit: str | None = None
    """The kind of privacy unit the site's ε is per (its policy), as it said."""
    attestation: dict[str, str] | None = None
    """The site's signed statement of what it trained on (:mod:`fedcpt.privacy.attestation`),
    as received; None when the site has no signing identity (unattested)."""


@dataclass(frozen=True)
class SiteEvalReport:
    """One site's held-out domain evaluation of the global adapter — or, under secure
    aggregation, the sum of several sites' (``summed_sites`` > 0): then ``tokens`` is
    their total and the values are token-weighted means over them."""

    site: str
    tokens: int
    loss: float
    base_loss: float
    ece: float
    data_drift: float | None = None
    """The site's base loss now minus the mean of its previous runs' (None: not sent)."""
    summed_sites: int = 0
    """Sites in a secure sum (0: one site's own evaluation, released in the clear)."""
    clipped: int = 0
    """Statistics the summed sites clipped to their fixed-point range."""


def site_name(msg: Message) -> str:
    """The site a reply came from (its node id if it did not say)."""
    record = msg.content.config_records.get(p.SITE) if msg.has_content() else None
    return str(record["name"]) if record and "name" in record else (
        f"node-{msg.metadata.src_node_id}")


def site_unit(msg: Message) -> str | None:
    """The kind of privacy unit a training reply says the site's ε is per."""
    record = msg.content.config_records.get(p.SITE) if msg.has_content() else None
    return str(record["unit"]) if record and "unit" in record else None


def site_attestation(msg: Message) -> dict[str, str] | None:
    """A training reply's attestation as received (checked for shape only: the server
    records it, whoever holds the CA certificate verifies it); UpdateRejected if
    malformed."""
    record = msg.content.config_records.get(p.ATTESTATION) if msg.has_content() else None
    return None if record is None else Attestation.from_dict(dict(record)).to_dict()


def reply_metrics(msg: Message, required: tuple[str, ...]) -> dict[str, float]:
    """The reply's numeric metrics; UpdateRejected if a required one is missing or not a
    finite number."""
    record = msg.content.metric_records.get(p.METRICS)
    if record is None:
        raise UpdateRejected("reply carries no 'metrics' record")
    values = {k: float(v) for k, v in record.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    missing = [k for k in required if k not in values or not math.isfinite(values[k])]
    if missing:
        raise UpdateRejected(f"reply metrics lack finite {missing}")
    return values


def train_metrics(msg: Message, max_examples: int) -> dict[str, float]:
    """A training reply's metrics, with ``num-examples`` in (0, max_examples] (0: no bound;
    a larger claim would let one site outweigh the rest)."""
    metrics = reply_metrics(msg, TRAIN_METRICS)
    if not 0 < metrics[p.NUM_EXAMPLES] <= (max_examples or math.inf):
        raise UpdateRejected(f"num-examples {metrics[p.NUM_EXAMPLES]:g} outside "
                             f"(0, {max_examples or 'inf'}]")
    return metrics


def site_report(msg: Message, metrics: dict[str, float], bytes_up: int,
                norm: float | None) -> SiteTrainReport:
    return SiteTrainReport(
        site=site_name(msg),
        num_examples=int(metrics[p.NUM_EXAMPLES]),
        train_loss=metrics.get(p.TRAIN_LOSS),
        seconds=metrics[p.TRAIN_SECONDS],
        bytes_up=bytes_up,
        update_norm=norm,
        unit=site_unit(msg),
        attestation=site_attestation(msg),
    )


def eval_report(msg: Message) -> SiteEvalReport:
    """One evaluation reply as a report; UpdateRejected if it erred or lacks a metric."""
    if msg.has_error():
        raise UpdateRejected(msg.error.reason)
    m = reply_metrics(msg, EVAL_METRICS)
    drift = m.get(p.DATA_DRIFT)
    if drift is not None and not math.isfinite(drift):
        raise UpdateRejected(f"reply metric {p.DATA_DRIFT!r} is not finite: {drift}")
    return SiteEvalReport(site=site_name(msg), tokens=int(m[p.NUM_EXAMPLES]),
                          loss=m[p.DOMAIN_LOSS], base_loss=m[p.DOMAIN_BASE_LOSS],
                          ece=m[p.DOMAIN_ECE], data_drift=drift)


def contribution(payload_key: str, payload: ArrayRecord, num_examples: int) -> RecordDict:
    """The canonical record of an accepted update: exactly what was checked, and its weight."""
    return RecordDict({payload_key: payload,
                       p.METRICS: MetricRecord({p.NUM_EXAMPLES: num_examples})})


class Aggregator(ABC):
    """Validates each training reply, then turns the accepted ones into one adapter.

    Parameters
    ----------
    max_examples : int
        Largest ``num-examples`` a site may claim (its local steps × batch; 0: no bound).
    """

    payload_key: str = p.ARRAYS
    """The record a training reply carries its update in."""

    def __init__(self, *, max_examples: int = 0) -> None:
        self.max_examples = max_examples

    @abstractmethod
    def validate(self, msg: Message, reference: ArrayRecord,
                 ) -> tuple[ArrayRecord, SiteTrainReport]:
        """What of ``msg`` may enter the aggregate, and the site's report; UpdateRejected
        if the reply is malformed. ``reference`` is the global adapter the site was sent."""

    @abstractmethod
    def aggregate(self, records: list[RecordDict], reference: ArrayRecord) -> ArrayRecord:
        """The round's aggregate from the accepted records (see :func:`contribution`);
        UpdateRejected if they cannot be combined."""
