"""Example-weighted FedAvg over LoRA adapters, rejecting malformed updates.

Aggregation is Flower's own :class:`flwr.serverapp.strategy.FedAvg` (McMahan et al.,
2017, https://arxiv.org/abs/1602.05629); this class adds what a federation of data sites
needs around it: each reply is checked (keys, shapes, dtypes, finite values) before it can
enter the global adapter, a round with fewer than ``min_sites`` valid replies keeps the
previous adapter, and per-site results go to a :class:`RoundListener`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcpt.core.adapters import check_update, count_bytes, update_norm
from fedcpt.exceptions import UpdateRejected
from fedcpt.strategies.base import RoundListener, SiteEvalReport, SiteTrainReport

log = logging.getLogger(__name__)

REQUIRED_METRICS = ("num-examples", "train-loss", "train-seconds")
# Reply metrics in which a DP site reports its cumulative ledger after the round
PRIVACY_METRICS = ("epsilon", "epsilon-rdp", "delta", "noise-multiplier", "sample-rate",
                   "dp-steps")


def site_name(msg: Message) -> str:
    """The site a reply came from (its node id if it did not say)."""
    record = msg.content.config_records.get("site") if msg.has_content() else None
    return str(record["name"]) if record else f"node-{msg.metadata.src_node_id}"


class AdapterFedAvg(FedAvg):
    """FedAvg over adapter tensors with update validation and per-site reporting.

    Parameters
    ----------
    min_sites : int
        Fewest valid training replies needed to aggregate a round.
    listener : RoundListener, optional
        Receives per-site train and evaluation results every round.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, min_sites: int = 1, listener: RoundListener | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_sites = min_sites
        self.listener = listener
        self._global: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted: list[Message] = []
        reports: list[SiteTrainReport] = []
        failures: list[str] = []
        for msg in replies:
            site = site_name(msg)
            if msg.has_error():
                failures.append(f"{site}: {msg.error.reason}")
                log.warning("round %d: site %s failed: %s", server_round, site,
                            msg.error.reason)
                continue
            try:
                arrays = msg.content.array_records.get("arrays")
                if arrays is None:
                    raise UpdateRejected("reply carries no 'arrays' record")
                check_update(arrays, self._global)
                metrics = msg.content.metric_records.get("metrics")
                missing = [k for k in REQUIRED_METRICS if metrics is None or k not in metrics]
                if missing:
                    raise UpdateRejected(f"reply metrics lack {missing}")
                if float(metrics["num-examples"]) <= 0:
                    raise UpdateRejected("num-examples must be positive")
            except UpdateRejected as err:
                failures.append(f"{site}: update rejected: {err}")
                log.warning("round %d: rejected update from site %s: %s", server_round, site,
                            err)
                continue
            accepted.append(msg)
            reports.append(SiteTrainReport(
                site=site,
                num_examples=int(metrics["num-examples"]),
                train_loss=float(metrics["train-loss"]),
                seconds=float(metrics["train-seconds"]),
                bytes_up=count_bytes(arrays),
                update_norm=update_norm(arrays, self._global),
                privacy={k: float(metrics[k]) for k in PRIVACY_METRICS if k in metrics},
            ))
        if self.listener is not None:
            self.listener.on_train(server_round, reports, failures)
        if len(accepted) < self.min_sites:
            log.warning("round %d: %d valid updates, fewer than min_sites=%d; the global "
                        "adapter is unchanged", server_round, len(accepted), self.min_sites)
            return None, None
        return super().aggregate_train(server_round, accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        replies = list(replies)
        reports = []
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed at site %s: %s", server_round,
                            site_name(msg), msg.error.reason)
                continue
            m = msg.content["metrics"]
            reports.append(SiteEvalReport(
                site=site_name(msg), tokens=int(m["num-examples"]),
                loss=float(m["domain-loss"]), base_loss=float(m["domain-base-loss"]),
                ece=float(m["domain-ece"]),
            ))
        if self.listener is not None:
            self.listener.on_evaluate(server_round, reports)
        return super().aggregate_evaluate(server_round, replies)

