"""What a server step is: it turns the round's aggregate into the next global adapter.

Steps see the aggregate, never an individual site's update, so they compose with secure
aggregation and, under DP, are post-processing. They live with the round loop (server/),
not with the strategies: a strategy only aggregates; a step trains or evaluates with the
server's own model and data (core), which the loop owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flwr.app import ArrayRecord


@dataclass(frozen=True)
class StepResult:
    """A step's proposed global adapter and what it did (for the run's metrics)."""

    arrays: ArrayRecord
    details: dict[str, Any] = field(default_factory=dict)
    rejects_round: bool = False
    """True: the round must not change the global adapter (the regression guard)."""


class ServerStep(Protocol):
    """One step applied, in order, to each round's aggregate."""

    name: str

    def apply(self, server_round: int, global_arrays: ArrayRecord, aggregated: ArrayRecord,
              client_examples: int) -> StepResult:
        ...


@runtime_checkable
class StatefulStep(Protocol):
    """A server step whose state survives ``--resume`` (saved beside each adapter version)."""

    def save_state(self, folder: Path) -> None:
        """Write the state after this round into ``folder`` (the round's version)."""
        ...

    def load_state(self, folder: Path) -> None:
        """Restore the state saved in ``folder``."""
        ...
