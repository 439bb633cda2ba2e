"""EWC (Kirkpatrick et al., 2017): sites pull the adapter toward the base, weighted by how
much each weight matters for general text.

Every round the server computes the diagonal Fisher of the round's global adapter on
blocks of its rehearsal pool (:func:`~fedcpt.core.fisher.diagonal_fisher`) and sends it
with the training instructions as a second ArrayRecord, ``fisher``; each site applies it
as the weights of its :class:`~fedcpt.core.training.Anchor` toward the initial adapter.
The Fisher comes from the server's own data, so it reveals nothing about any site, and
under DP-SGD the weighted pull is post-processing.

The Fisher is taken at the current global adapter rather than once at the base: at the
base LoRA's B is zero, so the loss does not depend on A there and A's Fisher would be 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcpt.core import protocol as p
from fedcpt.core.adapters import load_adapter, to_arrays
from fedcpt.core.fisher import diagonal_fisher
from fedcpt.core.model import AdaptedModel
from fedcpt.strategies.base import WrappedStrategy

log = logging.getLogger(__name__)


class FisherGrid:
    """A grid that attaches the Fisher to every training instruction sent through it (so
    a strategy's own re-sends, e.g. round retries, carry it too)."""

    def __init__(self, grid: Grid, fisher: ArrayRecord) -> None:
        self._grid = grid
        self.fisher = fisher

    def attach(self, msg: Message) -> Message:
        """Add the Fisher to a message that carries the adapter to train."""
        if p.ARRAYS in msg.content.array_records:
            msg.content[p.FISHER] = self.fisher
        return msg

    def send_and_receive(self, messages: Iterable[Message],
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive([self.attach(m) for m in messages],
                                           timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class FisherToSites(WrappedStrategy):
    """``strategy`` whose training instructions also carry the round's diagonal Fisher."""

    def __init__(self, strategy: Strategy, lm: AdaptedModel, blocks: torch.Tensor) -> None:
        super().__init__(strategy)
        self.lm = lm
        self.blocks = blocks

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        load_adapter(self.lm.model, arrays)
        view = FisherGrid(grid, to_arrays(diagonal_fisher(self.lm, self.blocks)))
        messages = list(self.strategy.configure_train(server_round, arrays, config,
                                                      view))  # type: ignore[arg-type]
        log.info("round %d · EWC: diagonal Fisher on %d general blocks sent to %d sites",
                 server_round, len(self.blocks), len(messages))
        return [view.attach(m) for m in messages]

    def summary(self) -> None:
        log.info("\t├──> EWC: diagonal Fisher on %d general blocks each round",
                 len(self.blocks))
        self.strategy.summary()
