"""FedAvg over LoRA adapters, rejecting malformed updates.

The averaging is Flower's own (``aggregate_arrayrecords``, McMahan et al., 2017,
https://arxiv.org/abs/1602.05629), weighted by each reply's ``num-examples``; every site
trains the same number of steps × batch, so in practice the sites weigh equally. Before
an update can enter the average it is checked: record layout, keys, shapes, dtypes,
finite values, required metrics, the example bound and the update-norm bound.

A reply carries the site's adapter at the site's own LoRA rank, in fp32 or compressed
(``federation.upload_dtype``, :mod:`fedcpt.core.upload`); it is decoded into the global
max-rank layout first, and every check runs on what was decoded. Sites of different ranks
are averaged by HetLoRA's zero-padding (Cho et al., 2024,
https://arxiv.org/abs/2401.06432; :mod:`fedcpt.core.ranks`): a component a site did not
train enters its update as zero.

Under site-level DP (``privacy.user_level``) the mean is **unweighted**: ``num-examples``
is a site's own claim, and a weight other than 1/n would let one site move the mean by
more than C/n, the sensitivity the round loop's noise σ·C/n is sized for (a site claiming
1000× the others would weigh ~1; sites claiming little would single out another's
update). Each update is also clipped to C here (Flower's ``compute_clip_model_update``; a
no-op for a site whose clipping mod already did), so the bound holds for any reply.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedcpt.core import protocol as p
from fedcpt.core.adapters import check_update, check_update_bound, count_bytes, update_norm
from fedcpt.core.upload import UploadDtype, decode_upload
from fedcpt.exceptions import UpdateRejected
from fedcpt.strategies.base import (
    Aggregator,
    SiteTrainReport,
    site_report,
    train_metrics,
)

SITE_WEIGHT = "site-weight"  # under site-level DP each aggregated site counts once


class AdapterFedAvg(Aggregator):
    """Example-weighted mean of plaintext adapter updates (unweighted under site-level DP).

    Parameters
    ----------
    max_update_norm : float
        Reject an update farther than this (L2) from the global adapter (0: no bound).
    max_examples : int
        See :class:`~fedcpt.strategies.base.Aggregator`.
    site_clip : float
        Site-level DP's clipping norm C: clip every update to C and weigh every site 1/n
        (0: no site-level DP, the example-weighted mean).
    upload_dtype : str
        The only wire form a reply may take (``federation.upload_dtype``).
    """

    def __init__(self, *, max_update_norm: float = 0.0, max_examples: int = 0,
                 site_clip: float = 0.0, upload_dtype: UploadDtype = "fp32") -> None:
        super().__init__(max_examples=max_examples)
        self.max_update_norm = max_update_norm
        self.site_clip = site_clip
        self.upload_dtype = upload_dtype

    def validate(self, msg: Message, reference: ArrayRecord,
                 ) -> tuple[ArrayRecord, SiteTrainReport]:
        wire = msg.content.array_records.get(p.ARRAYS)
        if wire is None or len(msg.content.array_records) != 1:
            raise UpdateRejected("reply must carry exactly one 'arrays' record")
        arrays, _ = decode_upload(wire, reference, self.upload_dtype)
        check_update(arrays, reference)
        metrics = train_metrics(msg, self.max_examples)
        norm = check_update_bound(arrays, reference, self.max_update_norm)
        return arrays, site_report(msg, metrics, count_bytes(wire), norm)

    def aggregate(self, records: list[RecordDict], reference: ArrayRecord) -> ArrayRecord:
        if not self.site_clip:
            return aggregate_arrayrecords(records, p.NUM_EXAMPLES)
        return aggregate_arrayrecords([self._clipped(r, reference) for r in records],
                                      SITE_WEIGHT)

    def _clipped(self, record: RecordDict, reference: ArrayRecord) -> RecordDict:
        """The record's update clipped to C from ``reference``, with weight 1."""
        keys = list(reference.keys())
        update = [record[p.ARRAYS][k].numpy() for k in keys]
        # only when it exceeds C: Flower's helper divides by the norm, zero for no change
        if update_norm(record[p.ARRAYS], reference) > self.site_clip:
            compute_clip_model_update(update, [reference[k].numpy() for k in keys],
                                      self.site_clip)
        return RecordDict({p.ARRAYS: ArrayRecord({k: Array(v) for k, v in zip(keys, update,
                                                                             strict=True)}),
                           p.METRICS: MetricRecord({SITE_WEIGHT: 1})})
