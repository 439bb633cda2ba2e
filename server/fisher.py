"""EWC (Kirkpatrick et al., 2017): sites pull the adapter toward the base, weighted by how
much each weight matters for general text.

Every round the server computes the diagonal Fisher of the round's global adapter on
blocks of its rehearsal pool (:func:`~fedcpt.core.fisher.diagonal_fisher`) and the round
loop sends it with the training instructions (retries included) as a second ArrayRecord,
``fisher``; each site applies it as the weights of its
:class:`~fedcpt.core.training.Anchor` toward the initial adapter. The Fisher comes from
the server's own data, so it reveals nothing about any site, and under DP-SGD the
weighted pull is post-processing.

The Fisher is taken at the current global adapter rather than once at the base: at the
base LoRA's B is zero, so the loss does not depend on A there and A's Fisher would be 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord

from fedcpt.core.adapters import load_adapter, to_arrays
from fedcpt.core.fisher import diagonal_fisher
from fedcpt.core.model import AdaptedModel

if TYPE_CHECKING:
    from fedcpt.server.run import ServerModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FisherForSites:
    """The diagonal Fisher of a global adapter on the server's general ``blocks``."""

    lm: AdaptedModel | ServerModel
    """The server's model; in a run its handle, so the Fisher waits for a pending evaluation."""
    blocks: torch.Tensor

    def __call__(self, server_round: int, global_arrays: ArrayRecord) -> ArrayRecord:
        load_adapter(self.lm.model, global_arrays)
        fisher = to_arrays(diagonal_fisher(self.lm, self.blocks))
        log.info("round %d · EWC: diagonal Fisher on %d general blocks sent with training",
                 server_round, len(self.blocks))
        return fisher
