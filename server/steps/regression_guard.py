"""Regression guard: reject a round that costs too much general capability.

The candidate adapter's loss on the server's rehearsal validation blocks (never the
evaluation set, which stays unbiased) is compared with the accepted global adapter's; a
rise above ``threshold`` nats rejects the round, logged at WARNING, and the previous
version stays global.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord

from fedcpt.core.model import AdaptedModel
from fedcpt.server.steps.base import StepResult
from fedcpt.server.steps.delta_scaling import validation_loss

log = logging.getLogger(__name__)


class RegressionGuard:
    """Keep the accepted adapter when a round's general loss rises more than allowed."""

    name = "regression_guard"

    def __init__(self, lm: AdaptedModel, validation: torch.Tensor, *, threshold: float,
                 batch_size: int) -> None:
        self.lm = lm
        self.validation = validation
        self.threshold = threshold
        self.batch_size = batch_size

    def apply(self, server_round: int, global_arrays: ArrayRecord, aggregated: ArrayRecord,
              client_examples: int) -> StepResult:
        before = validation_loss(self.lm, global_arrays, self.validation, self.batch_size)
        after = validation_loss(self.lm, aggregated, self.validation, self.batch_size)
        rise = after - before
        if rise > self.threshold:
            log.warning("round %d rejected by the regression guard: rehearsal loss rose "
                        "%.4f nats (limit %.4f); the previous adapter stays global",
                        server_round, rise, self.threshold)
            return StepResult(global_arrays, {"rejected": True, "rise": rise}, rejects_round=True)
        return StepResult(aggregated, {"rejected": False, "rise": rise})
