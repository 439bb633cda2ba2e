"""WiSE-style delta scaling (Wortsman et al., 2022, https://arxiv.org/abs/2109.01903):
move only part of the way from the global adapter to the round's aggregate.

Each round the server tries α from largest to smallest and keeps the largest whose loss on
held-out rehearsal data rises at most ``tolerance`` nats over the current global adapter.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord

from fedcpt.core.adapters import load_adapter, weighted_sum
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel
from fedcpt.server.steps.base import StepResult

log = logging.getLogger(__name__)


def validation_loss(lm: AdaptedModel, arrays: ArrayRecord, blocks: torch.Tensor,
                    batch_size: int) -> float:
    """Loss of ``arrays`` on server-held validation blocks."""
    load_adapter(lm.model, arrays)
    return evaluate_blocks(lm, blocks, batch_size).loss


def interpolate(global_arrays: ArrayRecord, aggregated: ArrayRecord,
                alpha: float) -> ArrayRecord:
    """global + α·(aggregated − global)."""
    return weighted_sum([(global_arrays, 1 - alpha), (aggregated, alpha)])


class DeltaScaling:
    """Choose α on the server's rehearsal validation blocks."""

    name = "delta_scaling"

    def __init__(self, lm: AdaptedModel, validation: torch.Tensor, *,
                 alphas: tuple[float, ...], tolerance: float, batch_size: int) -> None:
        self.lm = lm
        self.validation = validation
        self.alphas = sorted(alphas, reverse=True)
        self.tolerance = tolerance
        self.batch_size = batch_size

    def _loss(self, arrays: ArrayRecord) -> float:
        return validation_loss(self.lm, arrays, self.validation, self.batch_size)

    def apply(self, server_round: int, global_arrays: ArrayRecord, aggregated: ArrayRecord,
              client_examples: int) -> StepResult:
        reference = self._loss(global_arrays)
        for alpha in self.alphas:  # largest first; the smallest is kept if none passes
            candidate = interpolate(global_arrays, aggregated, alpha)
            loss = self._loss(candidate)
            if loss <= reference + self.tolerance:
                break
        log.info("round %d · delta scaling: α=%.2f (rehearsal loss %.4f → %.4f)",
                 server_round, alpha, reference, loss)
        return StepResult(candidate, {"alpha": alpha, "rehearsal_loss": loss})
