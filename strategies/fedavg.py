"""FedAvg over LoRA adapters, rejecting malformed updates.

The averaging is Flower's own (``aggregate_arrayrecords``, McMahan et al., 2017,
https://arxiv.org/abs/1602.05629) weighted by each reply's ``num-examples``; every site
trains the same number of steps × batch, so in practice the sites weigh equally. Before
an update can enter the average it is checked: record layout, keys, shapes, dtypes,
finite values, required metrics, the example bound and the update-norm bound.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcpt.core import protocol as p
from fedcpt.core.adapters import check_update, check_update_bound, count_bytes
from fedcpt.exceptions import UpdateRejected
from fedcpt.strategies.base import (
    Aggregator,
    SiteTrainReport,
    site_name,
    site_report,
    train_metrics,
)


class AdapterFedAvg(Aggregator):
    """Example-weighted mean of plaintext adapter updates.

    Parameters
    ----------
    max_update_norm : float
        Reject an update farther than this (L2) from the global adapter (0: no bound).
    max_examples : int
        See :class:`~fedcpt.strategies.base.Aggregator`.
    """

    def __init__(self, *, max_update_norm: float = 0.0, max_examples: int = 0) -> None:
        super().__init__(max_examples=max_examples)
        self.max_update_norm = max_update_norm

    def validate(self, msg: Message, reference: ArrayRecord,
                 ) -> tuple[ArrayRecord, SiteTrainReport]:
        arrays = msg.content.array_records.get(p.ARRAYS)
        if arrays is None or len(msg.content.array_records) != 1:
            raise UpdateRejected("reply must carry exactly one 'arrays' record")
        check_update(arrays, reference)
        metrics = train_metrics(msg, self.max_examples)
        norm = check_update_bound(arrays, reference, self.max_update_norm)
        return arrays, site_report(site_name(msg), metrics, count_bytes(arrays), norm)

    def aggregate(self, records: list[RecordDict], reference: ArrayRecord) -> ArrayRecord:
        return aggregate_arrayrecords(records, p.NUM_EXAMPLES)
