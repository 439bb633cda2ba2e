"""What a round protocol is: the mechanism that moves a round's updates from the sites to
one aggregate, chosen once per run (:func:`fedcpt.server.protocols.round_protocol`).

A protocol owns what its mechanism adds to the round, so the loop
(:mod:`fedcpt.server.round_loop`), the summary and the report ask it instead of reading
its flag: what it adds to the training request (:meth:`RoundProtocol.configure`), how an
attempt's exchange and aggregation run (:meth:`RoundProtocol.train`, a template whose steps
a mechanism overrides), how the sites' evaluation travels (:meth:`RoundProtocol.evaluate`),
its summary fields and its section of the report. Site-level DP wraps another protocol,
as Flower's DifferentialPrivacy wrappers wrap a strategy
(:mod:`fedcpt.server.protocols.site_dp`). A protocol's config section is checked where the
config loads (``config/rules.py``), before any protocol exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcpt.config import RunConfig
from fedcpt.runfolder.records import Summary
from fedcpt.server.round_loop import Attempt, Collected, collect_train, emit_sites
from fedcpt.strategies.base import Aggregator, SiteEvalReport


@dataclass
class Exchange:
    """How a protocol reaches the sites in one round: the Grid, the round's timeout and
    the fewest valid updates a round may aggregate."""

    grid: Grid
    server_round: int
    timeout: float
    min_sites: int

    def send(self, messages: list[Message]) -> list[Message]:
        """The replies to ``messages`` that arrive within the round timeout."""
        return list(self.grid.send_and_receive(messages, timeout=self.timeout)) \
            if messages else []


@dataclass
class Sent:
    """A training exchange: the replies, the nodes asked and the mechanism's session."""

    replies: list[Message]
    nodes: list[int]
    failures: list[str] = field(default_factory=list)
    session: Any = None


class RoundProtocol(ABC):
    """One round mechanism: configure the request, exchange and aggregate an attempt,
    evaluate, summarise and report."""

    section: ClassVar[str]
    """The config section the mechanism reads."""
    aggregator: Aggregator
    """Validates each training reply and combines the accepted ones."""

    def configure(self, config: ConfigRecord) -> ConfigRecord:
        """The config every training request carries (a mechanism adds its settings)."""
        return config

    def train(self, ex: Exchange, reference: ArrayRecord, content: RecordDict,
              nodes: list[int]) -> Attempt:
        """One attempt: send ``content`` to ``nodes``, validate the replies, aggregate."""
        sent = self.send_training(ex, content, nodes)
        collected = collect_train(ex.server_round, sent.replies, set(sent.nodes),
                                  self.aggregator, reference)
        emit_sites(ex.server_round, collected)
        failures = sent.failures + collected.failures
        if len(collected.accepted) < ex.min_sites:
            failures.append(f"{len(collected.accepted)} valid updates, fewer than "
                            f"min_sites={ex.min_sites}")
            return Attempt(None, collected, failures)
        if (refusal := self.refusal(collected)) is not None:
            failures.append(refusal)
            return Attempt(None, collected, failures)
        aggregate = self.aggregate(ex, sent, collected, reference, failures)
        if aggregate is not None:
            aggregate = self.postprocess(aggregate, len(collected.accepted))
        return Attempt(aggregate, collected, failures)

    @abstractmethod
    def send_training(self, ex: Exchange, content: RecordDict, nodes: list[int]) -> Sent:
        """Send the training request; the replies and the nodes that were asked."""

    def refusal(self, collected: Collected) -> str | None:
        """Why the attempt must not be released though it has enough updates (None: it may)."""
        return None

    @abstractmethod
    def aggregate(self, ex: Exchange, sent: Sent, collected: Collected,
                  reference: ArrayRecord, failures: list[str]) -> ArrayRecord | None:
        """The accepted updates combined (None: not aggregated, and ``failures`` say why)."""

    def postprocess(self, aggregate: ArrayRecord, n_updates: int) -> ArrayRecord:
        """The aggregate as released (a mechanism may add noise sized for ``n_updates``)."""
        return aggregate

    @abstractmethod
    def evaluate(self, ex: Exchange, content: RecordDict,
                 nodes: list[int]) -> list[SiteEvalReport]:
        """The evaluating sites' reports of ``content``'s adapter."""

    def summary(self, cfg: RunConfig, rounds: int, bytes_up: int) -> dict[str, Any]:
        """The :class:`~fedcpt.runfolder.records.Summary` fields the mechanism fills."""
        return {}

    def report_lines(self, summary: Summary) -> list[str]:
        """The mechanism's section of ``report.md`` (none: nothing to say)."""
        return []

    @abstractmethod
    def upload_form(self, cfg: RunConfig) -> str:
        """How an update travels, for the report's communication section."""
