"""Diagonal Fisher information of the adapter on held data (for EWC, Kirkpatrick et al.,
2017, https://arxiv.org/abs/1612.00796)."""

from __future__ import annotations

import torch

from fedcpt.core.adapters import adapter_state
from fedcpt.core.model import AdaptedModel
from fedcpt.core.training import adapter_param
from fedcpt.exceptions import FedcptError


def diagonal_fisher(lm: AdaptedModel, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher E[(∂ℓ/∂θ)²] of the adapter's current weights, one gradient
    per block (ℓ: the block's mean next-token loss), scaled so the largest entry is 1.

    Keys are peft's state-dict names (those of :func:`adapter_state`). Scaling to [0, 1]
    makes EWC's μ the pull on the most important coordinate, so ``lr·μ < 1`` keeps every
    coordinate's pull stable."""
    model = lm.model
    named = dict(model.named_parameters())
    keys = list(adapter_state(model))
    params = [named[adapter_param(named, k)] for k in keys]
    totals = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    model.eval()  # no dropout: the Fisher of the model that is served
    for block in blocks:
        batch = block[None].to(lm.device)
        with lm.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        for total, grad in zip(totals, torch.autograd.grad(loss, params), strict=True):
            total += grad.float() ** 2
    peak = max(float(t.max()) for t in totals)
    if not peak > 0:
        raise FedcptError("the diagonal Fisher is zero everywhere: the adapter's loss on the "
                          "general pool does not depend on its weights")
    return {k: (t / peak).cpu() for k, t in zip(keys, totals, strict=True)}
