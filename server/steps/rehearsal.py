"""Server-side rehearsal on the general pool the server holds (Ibrahim et al., 2024,
https://arxiv.org/abs/2403.08763: replay of old data protects what the model knew).

Two federated forms of replay, with ρ the replay fraction:

- ``mix``: the server trains its own update from the round's global adapter on rehearsal
  data (the same number of steps as a site) and averages it in with weight ρ — the
  federated form of mixing ρ old data into every batch.
- ``finetune``: after aggregation, the server fine-tunes the aggregate on rehearsal data
  for ρ × the round's client examples.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord

from fedcpt.config import TrainConfig
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays, weighted_sum
from fedcpt.core.model import AdaptedModel
from fedcpt.core.training import train_adapter
from fedcpt.server.steps.base import StepResult

log = logging.getLogger(__name__)


class Rehearsal:
    """Replay of the server's general pool, in ``mix`` or ``finetune`` mode."""

    name = "rehearsal"

    def __init__(self, lm: AdaptedModel, pool: torch.Tensor, train: TrainConfig, *,
                 mode: str, replay_fraction: float, lr_at: Callable[[int], float],
                 seed: int) -> None:
        self.lm = lm
        self.pool = pool
        self.train = train
        self.mode = mode
        self.rho = replay_fraction
        self.lr_at = lr_at
        """The sites' learning rate for a round (phase-aware: see RunConfig.lr_at)."""
        self.seed = seed

    def apply(self, server_round: int, global_arrays: ArrayRecord, aggregated: ArrayRecord,
              client_examples: int) -> StepResult:
        lr = self.lr_at(server_round)
        seed = self.seed * 1000 + server_round
        if self.mode == "mix":
            load_adapter(self.lm.model, global_arrays)
            result = train_adapter(self.lm, self.pool, self.train, lr=lr, seed=seed)
            own = to_arrays(adapter_state(self.lm.model))
            log.info("round %d · rehearsal (mix): server update on %d examples, weight %.2f",
                     server_round, result.examples, self.rho)
            mixed = weighted_sum([(aggregated, 1 - self.rho), (own, self.rho)])
            return StepResult(mixed, {"mode": "mix", "examples": result.examples,
                                      "weight": self.rho})
        steps = max(1, math.ceil(self.rho * client_examples / self.train.batch_size))
        load_adapter(self.lm.model, aggregated)
        train_adapter(self.lm, self.pool, dataclasses.replace(self.train, local_steps=steps),
                      lr=lr, seed=seed)
        log.info("round %d · rehearsal (finetune): %d steps on the general pool",
                 server_round, steps)
        return StepResult(to_arrays(adapter_state(self.lm.model)),
                          {"mode": "finetune", "steps": steps})
