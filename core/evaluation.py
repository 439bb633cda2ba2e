"""Held-out language-model metrics: mean token loss, perplexity, calibration, and drift
from the base model, per kind of general text.

- **ECE** (expected calibration error, Guo et al. 2017): next-token top-1 probability as
  confidence, in ``ECE_BINS`` equal-width bins; Σ_b (n_b / N)·|mean conf_b − accuracy_b|.
- **KL to base**: per token, KL(p_base ‖ p_adapted) = Σ_v p_base(v)·(log p_base(v) −
  log p_adapted(v)), averaged over tokens, with the base = the adapter disabled (peft's
  ``disable_adapter``). Unlike the loss it cannot fall below zero by recalibrating the
  model toward raw text: it measures how far the next-token distribution moved at all.
  It needs the base's log-probabilities, an adapter-off forward pass, so it is measured on
  the first ``kl_blocks`` blocks of each kind. While every LoRA ``B`` is zero the adapted
  model is the base (KL exactly 0) and its own log-probabilities serve. A
  :class:`BaseLogprobs` keeps them across rounds: the base is frozen and the blocks fixed,
  so the pass is made once per run, not every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedcpt.core.model import AdaptedModel

ECE_BINS = 15
BASE_LOGPROBS_BYTES = 2 * 1024**3
"""What a :class:`BaseLogprobs` may hold (SmolLM2's default evaluation needs ~750 MB)."""


@dataclass(frozen=True)
class EvalResult:
    """Metrics on a fixed set of held-out blocks (every block has the same token count)."""

    loss: float
    perplexity: float
    ece: float
    tokens: int
    block_losses: list[float] = field(repr=False)
    kl_to_base: float | None = None
    """Mean per-token KL(base ‖ adapted) in nats; None when not measured."""


@dataclass
class _Tally:
    """Running sums for one set of blocks: per-block losses, calibration bins, KL."""

    block_losses: list[float] = field(default_factory=list)
    bin_count: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS,
                                                                        dtype=torch.float64))
    bin_conf: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS,
                                                                       dtype=torch.float64))
    bin_correct: torch.Tensor = field(default_factory=lambda: torch.zeros(ECE_BINS,
                                                                          dtype=torch.float64))
    kl_sum: float = 0.0
    kl_tokens: int = 0

    def add(self, logprobs: torch.Tensor, targets: torch.Tensor,
            kl: torch.Tensor | None) -> None:
        """Blocks' log-probabilities (B, T-1, V), targets (B, T-1), and per-token KL of the
        first blocks of the batch (b ≤ B, T-1)."""
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        self.block_losses.extend(nll.mean(dim=1).double().cpu().tolist())
        conf, pred = logprobs.max(dim=-1)
        counts, conf_sums, correct_sums = calibration_bins(conf.exp().flatten().cpu(),
                                                           (pred == targets).flatten().cpu())
        self.bin_count += counts
        self.bin_conf += conf_sums
        self.bin_correct += correct_sums
        if kl is not None:
            self.kl_sum += kl.double().sum().item()
            self.kl_tokens += kl.numel()

    def merged(self, other: _Tally) -> _Tally:
        return _Tally(self.block_losses + other.block_losses, self.bin_count + other.bin_count,
                      self.bin_conf + other.bin_conf, self.bin_correct + other.bin_correct,
                      self.kl_sum + other.kl_sum, self.kl_tokens + other.kl_tokens)

    def result(self, with_kl: bool) -> EvalResult:
        tokens = int(self.bin_count.sum().item())
        loss = sum(self.block_losses) / len(self.block_losses)
        kl = self.kl_sum / self.kl_tokens if with_kl else None
        return EvalResult(loss=loss, perplexity=math.exp(loss),
                          ece=ece_from_bins(self.bin_count, self.bin_conf, self.bin_correct),
                          tokens=tokens, block_losses=self.block_losses, kl_to_base=kl)


class BaseLogprobs:
    """The base model's log-probabilities of fixed evaluation batches, by (kind, first
    block), up to ``max_bytes``; a batch beyond that is recomputed when it is needed."""

    def __init__(self, max_bytes: int = BASE_LOGPROBS_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._store: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, key: tuple[str, int]) -> torch.Tensor | None:
        return self._store.get(key)

    def keep(self, key: tuple[str, int], logprobs: torch.Tensor) -> None:
        size = logprobs.numel() * logprobs.element_size()
        if self.bytes + size <= self.max_bytes:
            self._store[key] = logprobs.clone()  # not a view that pins the whole batch
            self.bytes += size


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width confidence bin: count, sum of confidences, number correct."""
    conf = confidence.double().flatten()
    hits = correct.double().flatten()
    idx = torch.clamp((conf * bins).long(), min=0, max=bins - 1)
    return (torch.bincount(idx, minlength=bins).double(),
            torch.bincount(idx, weights=conf, minlength=bins),
            torch.bincount(idx, weights=hits, minlength=bins))


def ece_from_bins(count: torch.Tensor, conf_sum: torch.Tensor, correct_sum: torch.Tensor,
                  ) -> float:
    """Σ_b |Σ conf − Σ correct| / N: the count-weighted gap between confidence and accuracy."""
    total = count.sum().item()
    return float((conf_sum - correct_sum).abs().sum().item() / total) if total else 0.0


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    """ECE of predictions with top-1 ``confidence`` in [0, 1] and 0/1 ``correct``."""
    return ece_from_bins(*calibration_bins(confidence, correct, bins))


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(base ‖ other) in nats from log-probabilities over the last axis."""
    return (base_logprobs.exp() * (base_logprobs - logprobs)).sum(dim=-1)


def _logprobs(lm: AdaptedModel, batch: torch.Tensor) -> torch.Tensor:
    with lm.autocast():
        logits = lm.model(input_ids=batch).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)


def adapter_is_identity(model: torch.nn.Module) -> bool:
    """True while every LoRA ``B`` matrix is zero (peft's initialisation): the adapted model
    then computes exactly what the base does."""
    return all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)


@torch.no_grad()
def evaluate_kinds(lm: AdaptedModel, kinds: dict[str, torch.Tensor], batch_size: int, *,
                   kl_to_base: bool = False, kl_blocks: int | None = None,
                   base: BaseLogprobs | None = None,
                   ) -> tuple[dict[str, EvalResult], EvalResult]:
    """Loss, perplexity, ECE for each named set of blocks, and over all of them together
    (block-weighted). With ``kl_to_base``, also the per-token KL from the base model, on
    the first ``kl_blocks`` blocks of each set (all of them when None), reading and
    filling ``base`` when given (the same ``kinds`` and ``batch_size`` every call)."""
    model = lm.model
    was_training = model.training
    model.eval()
    identity = kl_to_base and adapter_is_identity(model)
    tallies = {name: _Tally() for name in kinds}
    for name, blocks in kinds.items():
        kl_end = len(blocks) if kl_blocks is None else min(kl_blocks, len(blocks))
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size].to(lm.device)
            logprobs = _logprobs(lm, batch)
            kl = None
            with_kl = batch[:max(0, kl_end - start)]
            if kl_to_base and len(with_kl):
                adapted = logprobs[:len(with_kl)]
                base_lp = None if base is None else base.get((name, start))
                if base_lp is None:
                    if identity:
                        base_lp = adapted
                    else:
                        with model.disable_adapter():
                            base_lp = _logprobs(lm, with_kl)
                    if base is not None:
                        base.keep((name, start), base_lp)
                kl = kl_divergence(base_lp, adapted)
            tallies[name].add(logprobs, batch[:, 1:], kl)
    model.train(was_training)
    overall = _Tally()
    for tally in tallies.values():
        overall = overall.merged(tally)
    return ({name: t.result(kl_to_base) for name, t in tallies.items()},
            overall.result(kl_to_base))


def evaluate_blocks(lm: AdaptedModel, blocks: torch.Tensor, batch_size: int, *,
                    kl_to_base: bool = False) -> EvalResult:
    """Mean next-token loss, perplexity and token-level ECE on one set of blocks."""
    return evaluate_kinds(lm, {"blocks": blocks}, batch_size, kl_to_base=kl_to_base)[1]


def paired_standard_error(before: list[float], after: list[float]) -> float:
    """Standard error of the mean per-block loss change between two evaluations."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return math.sqrt(var / n)
