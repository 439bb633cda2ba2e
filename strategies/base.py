"""What a strategy reports about each round, to whoever records the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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
