"""FedAvg under secure aggregation: the server sees only the sum of the updates.

Each round is :class:`~fedcpt.strategies.fedavg.AdapterFedAvg`'s round with the SecAgg+
stages around the training message (:mod:`fedcpt.privacy.secagg`): before it, the sampled
sites exchange signed keys and shares, bound to a round context that commits to the
adapter and config every site receives; the training reply carries the site's masked,
quantised update and its plaintext metrics; after it, the surviving sites sign the
survivor set and then reveal the shares that unmask the sum. What follows the sum —
server steps, the regression guard, recording — is the plain strategy's, unchanged.
Checks the server can no longer make on a single update (finite values, the norm bound)
are made by the site before masking.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcpt.config import RunConfig
from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.context import RoundContext, adapter_digest, config_digest
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.encoding import decode, vector_length
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED, STATE, SecAggFailed, SecAggRound
from fedcpt.strategies.base import SiteTrainReport
from fedcpt.strategies.fedavg import AdapterFedAvg

log = logging.getLogger(__name__)


class SecAggFedAvg(AdapterFedAvg):
    """:class:`AdapterFedAvg` with SecAgg+ in every training round.

    Parameters
    ----------
    cfg : RunConfig
        The run (its ``[secagg]`` section must be on and validated).
    **kwargs
        Passed to :class:`AdapterFedAvg`.
    """

    def __init__(self, *, cfg: RunConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self._round: SecAggRound | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        nodes = [m.metadata.dst_node_id for m in messages]
        params = SecAggParams.for_round(self.cfg, len(nodes))
        content = messages[0].content  # every site gets this adapter and config
        context = RoundContext(
            run_id=str(content[p.CONFIG].get(p.RUN_ID, "")),
            server_round=server_round + self.round_offset,
            adapter=adapter_digest(content[p.ARRAYS]), config=config_digest(content[p.CONFIG]),
            participants=tuple(sorted(nodes)))
        self._round = SecAggRound(grid, context, params, self.round_timeout)
        try:
            inbound = self._round.share_keys()
        except SecAggFailed as err:
            log.warning("round %d: %s", server_round + self.round_offset, err)
            inbound = {}
            self._failures.append(str(err))
        finally:
            self._failures.extend(self._round.failures)
            self._round.failures.clear()
        self._sampled = set(inbound)
        return [Message(RecordDict({p.ARRAYS: content[p.ARRAYS], p.CONFIG: content[p.CONFIG],
                                    STATE: record}),
                        dst_node_id=node, message_type=MASKED)
                for node, record in inbound.items()]

    def check_reply(self, msg: Message, site: str) -> tuple[ArrayRecord, SiteTrainReport]:
        masked = msg.content.array_records.get(p.MASKED)
        if masked is None or len(msg.content.array_records) != 1 or (
                list(masked) != [p.MASKED_VECTOR]):
            raise UpdateRejected(f"reply must carry exactly one '{p.MASKED}' record")
        vector = masked[p.MASKED_VECTOR].numpy()
        if vector.dtype != np.uint32 or vector.shape != (vector_length(self._global),):
            raise UpdateRejected(f"masked vector is {vector.dtype}{list(vector.shape)}, "
                                 f"expected uint32[{vector_length(self._global)}]")
        metrics = self.check_metrics(msg)
        return masked, self.site_report(site, metrics, vector.nbytes, None)

    def combine(self, server_round: int, accepted: dict[int, ArrayRecord],
                reports: list[SiteTrainReport], failures: list[str]) -> ArrayRecord | None:
        """Unmask the sum of the masked updates and turn it into the weighted mean."""
        secagg, self._round = self._round, None
        try:
            total, contributors = secagg.unmask(
                {node: rec[p.MASKED_VECTOR].numpy() for node, rec in accepted.items()})
            ddp = DistributedDP.for_config(self.cfg, secagg.params.threshold,
                                           len(secagg.nodes), vector_length(self._global) - 1)
            mean, weight = decode(total, contributors, self._global, secagg.params, ddp)
            claimed = sum(r.num_examples for r in reports)
            if weight != claimed:
                raise UpdateRejected(f"the summed weight {weight} differs from the "
                                     f"{claimed} examples the sites reported")
        except (SecAggFailed, UpdateRejected) as err:
            failures.extend(secagg.failures)
            failures.append(str(err) if isinstance(err, SecAggFailed)
                            else f"secure aggregation: {err}")
            log.warning("round %d: %s; the global adapter is unchanged", server_round, err)
            return None
        failures.extend(secagg.failures)
        return mean

