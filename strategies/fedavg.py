"""FedAvg over LoRA adapters, rejecting malformed updates.

The averaging is Flower's own (``aggregate_arrayrecords``, McMahan et al., 2017,
https://arxiv.org/abs/1602.05629) weighted by each reply's ``num-examples``; every site
trains the same number of steps × batch, so in practice the sites weigh equally. Around
it, this class adds what a federation of data sites needs: each reply is checked (record
layout, keys, shapes, dtypes, finite values, required metrics) before it can enter the
global adapter; a round with fewer than ``min_sites`` valid replies is sent again, then
stops the run or keeps the previous adapter; per-site results and failures go to a
:class:`RoundListener`; optional server
steps (:mod:`~fedcpt.strategies.rehearsal`, :mod:`~fedcpt.strategies.delta_scaling`)
turn the average into the next global adapter with the server's own general data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcpt.core import protocol as p
from fedcpt.core.adapters import check_update, count_bytes, update_norm
from fedcpt.exceptions import RoundFailed, UpdateRejected
from fedcpt.strategies.base import RoundListener, SiteEvalReport, SiteTrainReport
from fedcpt.strategies.server_step import ServerStep

log = logging.getLogger(__name__)

TRAIN_METRICS = (p.NUM_EXAMPLES, p.TRAIN_SECONDS)
EVAL_METRICS = (p.NUM_EXAMPLES, p.DOMAIN_LOSS, p.DOMAIN_BASE_LOSS, p.DOMAIN_ECE)


def site_name(msg: Message) -> str:
    """The site a reply came from (its node id if it did not say)."""
    record = msg.content.config_records.get(p.SITE) if msg.has_content() else None
    return str(record["name"]) if record and "name" in record else (
        f"node-{msg.metadata.src_node_id}")


def _metrics(msg: Message, required: tuple[str, ...]) -> dict[str, float]:
    """The reply's numeric metrics; raises UpdateRejected if any required one is missing
    or not a finite number."""
    record = msg.content.metric_records.get(p.METRICS)
    if record is None:
        raise UpdateRejected("reply carries no 'metrics' record")
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    missing = [k for k in required if k not in values or not math.isfinite(values[k])]
    if missing:
        raise UpdateRejected(f"reply metrics lack finite {missing}")
    return values


class AdapterFedAvg(FedAvg):
    """FedAvg over adapter tensors with update validation and per-site reporting.

    Parameters
    ----------
    min_sites : int
        Fewest valid training replies needed to aggregate a round.
    listener : RoundListener, optional
        Receives per-site train and evaluation results every round.
    max_examples : int
        Largest ``num-examples`` a site may claim (its local steps × batch); more would
        let one site outweigh the rest (0: no bound).
    round_offset : int
        Rounds already done before this start (a resumed run numbers on from there).
    max_update_norm : float
        Reject an update farther than this (L2) from the global adapter (0: no bound).
    server_steps : list of ServerStep, optional
        Applied in order to each round's average (rehearsal, delta scaling).
    round_timeout : float
        Seconds to wait for the replies of a retried round (and of extra exchanges).
    round_retries : int
        Times a round with fewer than ``min_sites`` valid updates is sent again.
    stop_on_failed_round : bool
        Then raise :class:`~fedcpt.exceptions.RoundFailed` (else keep the global adapter).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling fractions and minima).
    """

    def __init__(self, *, min_sites: int = 1, listener: RoundListener | None = None,
                 server_steps: list[ServerStep] | None = None, max_update_norm: float = 0.0,
                 round_offset: int = 0, max_examples: int = 0, round_timeout: float = 3600.0,
                 round_retries: int = 0, stop_on_failed_round: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.round_offset = round_offset
        self.max_examples = max_examples
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self.listener = listener
        self.server_steps = list(server_steps or [])
        self.round_timeout = round_timeout
        self.round_retries = round_retries
        self.stop_on_failed_round = stop_on_failed_round
        self._global: ArrayRecord | None = None
        self._config: ConfigRecord | None = None
        self._grid: Grid | None = None
        self._sampled: set[int] = set()
        self._failures: list[str] = []  # failures before the training replies arrive

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._global, self._config, self._grid = arrays, config, grid
        self._failures = []
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raw_round, server_round = server_round, server_round + self.round_offset
        failures: list[str] = []
        arrays = None
        for attempt in range(self.round_retries + 1):
            if attempt:
                log.warning("round %d: not aggregated; sending the round again (retry %d of "
                            "%d)", server_round, attempt, self.round_retries)
                messages = self.configure_train(raw_round, self._global, self._config,
                                                self._grid)
                replies = self._grid.send_and_receive(messages, timeout=self.round_timeout)
            accepted, reports, new_failures = self._collect(server_round, replies)
            if len(accepted) >= self.min_sites:
                arrays = self.combine(server_round, accepted, reports, new_failures)
            else:
                new_failures.append(f"{len(accepted)} valid updates, fewer than "
                                    f"min_sites={self.min_sites}")
            failures += [f"attempt {attempt + 1}: {f}" if self.round_retries else f
                         for f in new_failures]
            if arrays is not None:
                break
        if arrays is None:
            if self.listener is not None:
                self.listener.on_train(server_round, reports, failures, False)
            if self.stop_on_failed_round:
                raise RoundFailed(
                    f"round {server_round} was not aggregated after {self.round_retries} "
                    f"retries: {'; '.join(failures[-3:])}. Fix the sites and continue "
                    "with --resume, or set federation.failed_round = \"skip\"")
            log.warning("round %d: not aggregated; the global adapter is unchanged",
                        server_round)
            return None, None
        total = sum(r.num_examples for r in reports)
        details: dict[str, dict] = {}
        for step in self.server_steps:
            arrays, details[step.name] = step.apply(server_round, self._global, arrays, total)
        rejected = details.get("regression_guard", {}).get("rejected", False)
        if self.listener is not None:
            self.listener.on_train(server_round, reports, failures, not rejected)
            if details:
                self.listener.on_server_steps(server_round, details)
        return arrays, MetricRecord({p.NUM_EXAMPLES: total})

    def _collect(self, server_round: int, replies: Iterable[Message],
                 ) -> tuple[dict[int, ArrayRecord], list[SiteTrainReport], list[str]]:
        """The valid updates by node, their sites' reports, and every failure."""
        accepted: dict[int, ArrayRecord] = {}
        reports: list[SiteTrainReport] = []
        failures: list[str] = list(self._failures)
        replied: set[int] = set()
        for msg in replies:
            node, site = msg.metadata.src_node_id, site_name(msg)
            replied.add(node)
            if msg.has_error():
                failures.append(f"{site}: {msg.error.reason}")
                log.warning("round %d: site %s failed: %s", server_round, site,
                            msg.error.reason)
                continue
            try:
                payload, report = self.check_reply(msg, site)
            except UpdateRejected as err:
                failures.append(f"{site}: update rejected: {err}")
                log.warning("round %d: rejected update from site %s: %s", server_round, site,
                            err)
                continue
            accepted[node] = payload
            reports.append(report)
        for node in sorted(self._sampled - replied):
            failures.append(f"node-{node}: no reply within the round timeout")
            log.warning("round %d: node %d did not reply in time", server_round, node)
        return accepted, reports, failures

    def check_reply(self, msg: Message, site: str) -> tuple[ArrayRecord, SiteTrainReport]:
        """Validate one training reply; raise UpdateRejected, or return what enters the
        aggregate and the site's report."""
        arrays = msg.content.array_records.get(p.ARRAYS)
        if arrays is None or len(msg.content.array_records) != 1:
            raise UpdateRejected("reply must carry exactly one 'arrays' record")
        check_update(arrays, self._global)
        metrics = self.check_metrics(msg)
        norm = update_norm(arrays, self._global)
        if self.max_update_norm and norm > self.max_update_norm:
            raise UpdateRejected(f"update norm {norm:.3f} exceeds the bound "
                                 f"{self.max_update_norm}")
        return arrays, self.site_report(site, metrics, count_bytes(arrays), norm)

    def check_metrics(self, msg: Message) -> dict[str, float]:
        """The reply's training metrics, with ``num-examples`` within its bound."""
        metrics = _metrics(msg, TRAIN_METRICS)
        if not 0 < metrics[p.NUM_EXAMPLES] <= (self.max_examples or math.inf):
            raise UpdateRejected(f"num-examples {metrics[p.NUM_EXAMPLES]:g} outside "
                                 f"(0, {self.max_examples or 'inf'}]")
        return metrics

    @staticmethod
    def site_report(site: str, metrics: dict[str, float], bytes_up: int,
                    norm: float | None) -> SiteTrainReport:
        return SiteTrainReport(
            site=site,
            num_examples=int(metrics[p.NUM_EXAMPLES]),
            train_loss=metrics.get(p.TRAIN_LOSS),
            seconds=metrics[p.TRAIN_SECONDS],
            bytes_up=bytes_up,
            update_norm=norm,
            privacy={k: metrics[k] for k in p.PRIVACY_METRICS if k in metrics},
        )

    def combine(self, server_round: int, accepted: dict[int, ArrayRecord],
                reports: list[SiteTrainReport], failures: list[str]) -> ArrayRecord | None:
        """The weighted average of the accepted updates (Flower's own averaging)."""
        # Canonical records: what reaches the average is exactly what was checked.
        records = [RecordDict({p.ARRAYS: arrays,
                               p.METRICS: MetricRecord({p.NUM_EXAMPLES: r.num_examples})})
                   for arrays, r in zip(accepted.values(), reports, strict=True)]
        return aggregate_arrayrecords(records, self.weighted_by_key)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config,
                                          grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        server_round += self.round_offset
        reports = []
        for msg in replies:
            site = site_name(msg)
            try:
                if msg.has_error():
                    raise UpdateRejected(msg.error.reason)
                m = _metrics(msg, EVAL_METRICS)
            except UpdateRejected as err:
                log.warning("round %d: evaluation failed at site %s: %s", server_round, site,
                            err)
                continue
            reports.append(SiteEvalReport(
                site=site, tokens=int(m[p.NUM_EXAMPLES]), loss=m[p.DOMAIN_LOSS],
                base_loss=m[p.DOMAIN_BASE_LOSS], ece=m[p.DOMAIN_ECE]))
        if self.listener is not None:
            self.listener.on_evaluate(server_round, reports)
        tokens = sum(r.tokens for r in reports)
        if not tokens:
            return None
        return MetricRecord({p.DOMAIN_LOSS: sum(r.loss * r.tokens for r in reports) / tokens})
