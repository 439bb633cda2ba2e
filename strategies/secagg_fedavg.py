"""FedAvg under secure aggregation: the server sees only the sum of the updates.

The SecAgg+ round protocol (:mod:`fedcpt.server.protocols.secagg`) calls SecAgg+'s stages
(:mod:`fedcpt.privacy.secagg`) explicitly around the training message:
:meth:`SecAggFedAvg.open_round` and its ``share_keys`` (stages 1–2: keys and shares)
before it; the training message carries each site's inbound shares
(stage 3) and its reply the masked, quantised update; :meth:`SecAggFedAvg.unmask`
(stages 4–5) has the surviving sites sign the survivor set, then asks them for the shares
that unmask the sum;
:meth:`SecAggFedAvg.aggregate` turns that sum into the mean: weighted by ``num-examples``,
or, under site-level DP (distributed DP, :mod:`fedcpt.privacy.secagg.ddp`), unweighted over
the n sites unmasked, so no site's claim moves it by more than C/n. Checks the server
can no longer make on a single update (finite values, the norm bound) are made by the
site before masking.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedcpt.config import RunConfig
from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.context import TRAIN, RoundContext, adapter_digest, config_digest
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.encoding import decode, vector_length
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED, STATE, SecAggRound
from fedcpt.strategies.base import (
    Aggregator,
    SiteTrainReport,
    site_report,
    train_metrics,
)

CONTRIBUTORS = "contributors"  # metric of the unmasked sum: how many sites it covers
SAMPLED = "sampled"  # ... and how many the round sampled (distributed DP is sized for them)


class SecAggFedAvg(Aggregator):
    """Example-weighted mean of SecAgg+-masked updates (unweighted under site-level DP).

    Parameters
    ----------
    cfg : RunConfig
        The run (its ``[secagg]`` section must be on and validated).
    max_examples : int
        See :class:`~fedcpt.strategies.base.Aggregator`.
    """

    payload_key = p.MASKED

    def __init__(self, *, cfg: RunConfig, max_examples: int = 0) -> None:
        super().__init__(max_examples=max_examples)
        self.cfg = cfg

    def open_round(self, grid: Grid, nodes: list[int], server_round: int, timeout: float,
                   content: RecordDict, purpose: str = TRAIN) -> SecAggRound:
        """The SecAgg+ state of a round's ``purpose`` session (training, or the round's
        evaluation) over the sampled ``nodes``, bound to the adapter and config of the
        ``content`` every site receives (the round context); its ``share_keys()`` runs
        stages 1–2 (and raises SecAggFailed below the threshold)."""
        context = RoundContext(
            run_id=str(content[p.CONFIG].get(p.RUN_ID, "")), server_round=server_round,
            adapter=adapter_digest(content[p.ARRAYS]), config=config_digest(content[p.CONFIG]),
            participants=tuple(sorted(nodes)), purpose=purpose)
        params = (SecAggParams.for_round if purpose == TRAIN
                  else SecAggParams.for_evaluation)(self.cfg, len(nodes))
        return SecAggRound(grid, context, params, timeout)

    @staticmethod
    def training_message(content: RecordDict, node: int, shares: ConfigRecord) -> Message:
        """Stage 3's request: the plain training content plus the site's inbound shares."""
        return Message(RecordDict({**dict(content.items()), STATE: shares}),
                       dst_node_id=node, message_type=MASKED)

    def validate(self, msg: Message, reference: ArrayRecord,
                 ) -> tuple[ArrayRecord, SiteTrainReport]:
        masked = msg.content.array_records.get(p.MASKED)
        if masked is None or len(msg.content.array_records) != 1 or (
                list(masked) != [p.MASKED_VECTOR]):
            raise UpdateRejected(f"reply must carry exactly one '{p.MASKED}' record")
        vector = masked[p.MASKED_VECTOR].numpy()
        if vector.dtype != np.uint32 or vector.shape != (vector_length(reference),):
            raise UpdateRejected(f"masked vector is {vector.dtype}{list(vector.shape)}, "
                                 f"expected uint32[{vector_length(reference)}]")
        metrics = train_metrics(msg, self.max_examples)
        return masked, site_report(msg, metrics, vector.nbytes, None)

    @staticmethod
    def unmask(secagg: SecAggRound, accepted: dict[int, RecordDict]) -> RecordDict:
        """Stage 4: the sum of the accepted masked vectors, and the examples the sites
        claimed, as one record. Raises SecAggFailed if it cannot be unmasked."""
        total, contributors = secagg.unmask(
            {node: rec[p.MASKED][p.MASKED_VECTOR].numpy() for node, rec in accepted.items()})
        claimed = sum(int(rec[p.METRICS][p.NUM_EXAMPLES]) for rec in accepted.values())
        return RecordDict({
            p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(total)}),
            p.METRICS: MetricRecord({p.NUM_EXAMPLES: claimed, CONTRIBUTORS: contributors,
                                     SAMPLED: len(secagg.nodes)}),
            p.CONFIG: secagg.params.to_record()})

    def aggregate(self, records: list[RecordDict], reference: ArrayRecord) -> ArrayRecord:
        """The mean from the one unmasked sum :meth:`unmask` returns: example-weighted, or
        unweighted under site-level DP (distributed DP)."""
        (summed,) = records
        metrics = summed[p.METRICS]
        params = SecAggParams.from_record(summed[p.CONFIG])
        ddp = DistributedDP.for_config(self.cfg, params.threshold, int(metrics[SAMPLED]),
                                       vector_length(reference) - 1)
        mean, weight = decode(summed[p.MASKED][p.MASKED_VECTOR].numpy(),
                              int(metrics[CONTRIBUTORS]), reference, params, ddp)
        if ddp is None and weight != metrics[p.NUM_EXAMPLES]:
            raise UpdateRejected(f"the summed weight {weight} differs from the "
                                 f"{metrics[p.NUM_EXAMPLES]} examples the sites reported")
        return mean
