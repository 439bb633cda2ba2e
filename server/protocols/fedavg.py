"""Plain FedAvg: each site's update travels in the clear and is checked on its own."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, MessageType, RecordDict

from fedcpt.config import RunConfig
from fedcpt.exceptions import UpdateRejected
from fedcpt.server.protocols.base import Exchange, RoundProtocol, Sent
from fedcpt.server.round_loop import Collected, collect_evaluate, messages_to
from fedcpt.strategies.base import SiteEvalReport
from fedcpt.strategies.fedavg import AdapterFedAvg

log = logging.getLogger(__name__)


class PlainFedAvg(RoundProtocol):
    """Updates and evaluations in the clear, averaged by ``aggregator``."""

    section = "federation"

    def __init__(self, aggregator: AdapterFedAvg) -> None:
        self.aggregator = aggregator

    def send_training(self, ex: Exchange, content: RecordDict, nodes: list[int]) -> Sent:
        return Sent(ex.send(messages_to(nodes, content, MessageType.TRAIN)), nodes)

    def aggregate(self, ex: Exchange, sent: Sent, collected: Collected,
                  reference: ArrayRecord, failures: list[str]) -> ArrayRecord | None:
        try:
            return self.aggregator.aggregate(list(collected.accepted.values()), reference)
        except UpdateRejected as err:
            failures.append(str(err))
            log.warning("round %d: %s; the global adapter is unchanged", ex.server_round, err)
            return None

    def evaluate(self, ex: Exchange, content: RecordDict,
                 nodes: list[int]) -> list[SiteEvalReport]:
        return collect_evaluate(ex.server_round,
                                ex.send(messages_to(nodes, content, MessageType.EVALUATE)))

    def upload_form(self, cfg: RunConfig) -> str:
        return f"{cfg.federation.upload_dtype}, each at its own rank ≤ {cfg.lora.r}"
