"""Held-out language-model metrics: mean token loss, perplexity and calibration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedcpt.core.model import AdaptedModel

ECE_BINS = 15


@dataclass(frozen=True)
class EvalResult:
    """Metrics on a fixed set of held-out blocks (every block has the same token count)."""

    loss: float
    perplexity: float
    ece: float
    tokens: int
    block_losses: list[float] = field(repr=False)


@torch.no_grad()
def evaluate_blocks(lm: AdaptedModel, blocks: torch.Tensor, batch_size: int) -> EvalResult:
    """Mean next-token loss, perplexity and token-level expected calibration error.

    ECE uses the top-1 probability as confidence in ``ECE_BINS`` equal-width bins.
    """
    model = lm.model
    was_training = model.training
    model.eval()
    block_losses: list[float] = []
    bin_count = torch.zeros(ECE_BINS, dtype=torch.float64)
    bin_conf = torch.zeros(ECE_BINS, dtype=torch.float64)
    bin_correct = torch.zeros(ECE_BINS, dtype=torch.float64)
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size].to(lm.device)
        with lm.autocast():
            logits = model(input_ids=batch).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
        targets = batch[:, 1:]
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        block_losses.extend(nll.mean(dim=1).double().cpu().tolist())
        conf, pred = logprobs.max(dim=-1)
        conf = conf.exp().double().flatten().cpu()
        correct = (pred == targets).double().flatten().cpu()
        bins = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
        bin_count += torch.bincount(bins, minlength=ECE_BINS)
        bin_conf += torch.bincount(bins, weights=conf, minlength=ECE_BINS)
        bin_correct += torch.bincount(bins, weights=correct, minlength=ECE_BINS)
    model.train(was_training)
    total = bin_count.sum().item()
    ece = float((bin_conf - bin_correct).abs().sum().item() / total)
    loss = sum(block_losses) / len(block_losses)
    return EvalResult(loss=loss, perplexity=math.exp(loss), ece=ece, tokens=int(total),
                      block_losses=block_losses)


def paired_standard_error(before: list[float], after: list[float]) -> float:
    """Standard error of the mean per-block loss change between two evaluations."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return math.sqrt(var / n)
