"""What a strategy reports about each round, to whoever records the run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


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
    privacy: dict[str, float] = field(default_factory=dict)
    """The site's cumulative DP accounting after this round (empty without DP)."""


@dataclass(frozen=True)
class SiteEvalReport:
    """One site's held-out domain evaluation of the global adapter."""

    site: str
    tokens: int
    loss: float
    base_loss: float
    ece: float


class RoundListener(Protocol):
    """Receives per-site results as a strategy aggregates them."""

    def on_train(self, server_round: int, reports: list[SiteTrainReport],
                 failures: list[str], aggregated: bool) -> None: ...

    def on_evaluate(self, server_round: int, reports: list[SiteEvalReport]) -> None: ...

    def on_server_steps(self, server_round: int, details: dict[str, dict[str, Any]]) -> None:
        """What each server step did this round (rehearsal, α, regression guard)."""
        ...


class WrappedStrategy(Strategy):
    """A Flower strategy that hands every call to ``strategy``; subclasses change one
    step (e.g. what ``configure_train`` sees or sends)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
