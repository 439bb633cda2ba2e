"""SecAgg+ (Bell et al. 2020): the server sees only the sum of the sites' masked updates,
and of their evaluations (:mod:`fedcpt.server.secure_eval`).

Stages 1–2 (keys, shares) run before the training message, which carries each site's
inbound shares (stage 3); stages 4–5 unmask the sum of the accepted replies
(:class:`~fedcpt.strategies.secagg_fedavg.SecAggFedAvg`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from flwr.app import ArrayRecord, RecordDict

from fedcpt.config import RunConfig
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.params import MODULUS, SecAggParams
from fedcpt.privacy.secagg.server import SecAggFailed
from fedcpt.runfolder.records import Summary
from fedcpt.server.protocols.base import Exchange, RoundProtocol, Sent
from fedcpt.server.round_loop import Collected
from fedcpt.server.secure_eval import evaluate_securely
from fedcpt.strategies.base import SiteEvalReport
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg

log = logging.getLogger(__name__)


class SecAggPlus(RoundProtocol):
    """Masked training and evaluation through SecAgg+ sessions."""

    section = "secagg"

    def __init__(self, aggregator: SecAggFedAvg) -> None:
        self.aggregator = aggregator

    def send_training(self, ex: Exchange, content: RecordDict, nodes: list[int]) -> Sent:
        """Stages 1–2, then stage 3's request to each site still present (none if the
        stages failed: then no site trains this attempt, and the failures say why)."""
        secagg = self.aggregator.open_round(ex.grid, nodes, ex.server_round, ex.timeout,
                                            content)
        try:
            shares = secagg.share_keys()
        except SecAggFailed as err:
            log.warning("round %d: %s", ex.server_round, err)
            shares = {}
            secagg.failures.append(str(err))
        failures = list(secagg.failures)
        secagg.failures.clear()
        messages = [self.aggregator.training_message(content, n, s) for n, s in shares.items()]
        return Sent(ex.send(messages), list(shares), failures, secagg)

    def aggregate(self, ex: Exchange, sent: Sent, collected: Collected,
                  reference: ArrayRecord, failures: list[str]) -> ArrayRecord | None:
        """Stages 4–5: only the sum of the accepted updates is unmasked."""
        secagg = sent.session
        try:
            summed = SecAggFedAvg.unmask(secagg, collected.accepted)
            aggregate = self.aggregator.aggregate([summed], reference)
        except (SecAggFailed, UpdateRejected) as err:
            failures += secagg.failures
            failures.append(f"secure aggregation: {err}" if isinstance(err, UpdateRejected)
                            else str(err))
            log.warning("round %d: %s; the global adapter is unchanged", ex.server_round, err)
            return None
        failures += secagg.failures
        return aggregate

    def evaluate(self, ex: Exchange, content: RecordDict,
                 nodes: list[int]) -> list[SiteEvalReport]:
        return evaluate_securely(self.aggregator, ex.grid, nodes, ex.server_round, content,
                                 ex.timeout)

    def summary(self, cfg: RunConfig, rounds: int, bytes_up: int) -> dict[str, Any]:
        """Whether the server saw only sums, and the SecAgg+ parameters of a full round."""
        params = SecAggParams.for_round(cfg, cfg.sites_per_round)
        return {"secagg": {"enabled": True, "protocol": "SecAgg+ (Bell et al. 2020)",
                           **asdict(params), "modulus": MODULUS}}

    def report_lines(self, summary: Summary) -> list[str]:
        a = summary.secagg
        return ["", "## Secure aggregation", "",
                f"Every round ran {a['protocol']}: the server saw only the weighted sum of "
                f"the sites' updates. Each site shared its secrets with {a['num_shares']} "
                f"sites (itself included); any {a['threshold']} of them could unmask it, "
                f"so a round survived up to {a['num_shares'] - a['threshold']} of a site's "
                "neighbours dropping. Each site checked its own update before masking and "
                f"quantised it over ±{a['clipping_range']:g} to "
                f"{a['quantization_range']:,} levels; per-site update norms are therefore "
                "not shown. The sites' evaluations went through a SecAgg+ session of "
                "their own: the server saw only their sum."]

    def upload_form(self, cfg: RunConfig) -> str:
        return f"masked uint32 at the global rank {cfg.lora.r}"
