"""Local training of the LoRA adapter for one round (the non-private step)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedcpt.config import TrainConfig
from fedcpt.core.lm_loss import next_token_loss
from fedcpt.core.model import AdaptedModel


class Anchor:
    """A pull of the adapter toward fixed tensors (FedProx: the round's global adapter;
    L2-SP: the initial adapter, i.e. the base model; EWC: the initial adapter, weighted by
    a diagonal Fisher).

    Applied after each optimizer step as θ ← θ − lr·μ·w·(θ − θ₀), the decoupled form of the
    gradient of (μ/2)·Σ w·(θ − θ₀)² (w = 1 without ``weights``). It touches no data, so
    under DP-SGD it is post-processing and costs no privacy (a penalty added to the loss
    would be dropped by Opacus, which replaces gradients with clipped per-sample ones).
    Weights in [0, 1] keep each coordinate's pull within the unweighted one.
    """

    def __init__(self, model: torch.nn.Module, targets: dict[str, torch.Tensor],
                 weight: float, weights: dict[str, torch.Tensor] | None = None) -> None:
        named = dict(model.named_parameters())
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
        for key, target in targets.items():
            param = named[adapter_param(named, key)]
            w = None if weights is None else weights[key].to(param)
            self.pairs.append((param, target.to(param), w))
        self.weight = weight

    @torch.no_grad()
    def pull(self, lr: float) -> None:
        for param, target, w in self.pairs:
            step = lr * self.weight * (param - target)
            param.sub_(step if w is None else w * step)


def adapter_param(named: dict[str, torch.nn.Parameter], key: str) -> str:
    """The model parameter behind a peft state-dict key (which omits the adapter name)."""
    prefix, _, last = key.rpartition(".")
    candidate = f"{prefix}.default.{last}"
    if candidate in named:
        return candidate
    if key in named:
        return key
    raise KeyError(f"adapter tensor {key} has no parameter in the model")


@dataclass(frozen=True)
class TrainResult:
    """What one site's local round did."""

    steps: int
    examples: int
    tokens: int
    mean_loss: float
    seconds: float


def train_adapter(
    lm: AdaptedModel,
    blocks: torch.Tensor,
    train: TrainConfig,
    *,
    lr: float,
    seed: int,
    anchor: Anchor | None = None,
) -> TrainResult:
    """Run ``train.local_steps`` AdamW steps on batches drawn from ``blocks``.

    Only LoRA parameters require gradients. Batches are drawn uniformly with replacement
    from a generator seeded per (site, round), so a run is reproducible. The optimizer is
    fresh each round (as in FedAvg with local Adam): its state never leaves the site. A
    batch runs as physical batches of at most ``train.max_physical_batch_size`` blocks
    whose gradients add up to the whole batch's (every block has the same token count).
    """
    model = lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(train.local_steps):
        idx = torch.randint(len(blocks), (train.batch_size,), generator=generator)
        batch = blocks[idx].to(lm.device)  # (B, T)
        loss = _accumulate_gradient(lm, batch, train.max_physical_batch_size)
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if anchor is not None:
            anchor.pull(lr)
        losses.append(loss)
    model.eval()
    examples = train.local_steps * train.batch_size
    return TrainResult(
        steps=train.local_steps,
        examples=examples,
        tokens=examples * blocks.shape[1],
        mean_loss=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )


def _accumulate_gradient(lm: AdaptedModel, batch: torch.Tensor, physical: int) -> float:
    """Backpropagate the mean next-token loss of ``batch`` in physical batches of at most
    ``physical`` blocks (0: all at once); returns that mean loss."""
    chunks = batch.split(physical) if physical else (batch,)
    total = 0.0
    for chunk in chunks:
        with lm.autocast():
            loss = next_token_loss(lm.model, chunk) * (len(chunk) / len(batch))
        loss.backward()
        total += loss.item()
    return total
