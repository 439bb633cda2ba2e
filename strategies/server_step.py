"""A step the server applies to each round's aggregated adapter (after averaging)."""

from __future__ import annotations

from typing import Any, Protocol

from flwr.app import ArrayRecord


class ServerStep(Protocol):
    """Turns the round's aggregate into the next global adapter using only server data.

    Steps see the aggregate, never an individual site's update, so they compose with
    secure aggregation and, under record-level DP, are post-processing.
    """

    name: str

    def apply(self, server_round: int, global_arrays: ArrayRecord, aggregated: ArrayRecord,
              client_examples: int) -> tuple[ArrayRecord, dict[str, Any]]:
        """The next global adapter, and what the step did (for the run's metrics)."""
        ...
