"""Unit-level DP-SGD on the LoRA parameters with Opacus (Abadi et al., 2016).

The privacy unit is the site policy's (a document, a patient, ...). Each step samples
*units* by Poisson sampling at rate ``q = batch_size / units``, and each sampled unit
contributes exactly one block, drawn uniformly from its own blocks: its gradient is
clipped to ``max_grad_norm`` by Opacus, so one unit moves the step's gradient sum by at
most C however many blocks it holds, and Opacus adds Gaussian noise of std σ·C. That is
the sampled Gaussian mechanism the accountant analyses, per unit. (Summing a unit's blocks
and clipping once would use more of its text per step, at the cost of a backward pass over
all of them; one block per unit keeps the physical batch equal to the number of sampled
units.) A step whose Poisson sample is empty still releases noise: it is a noise-only step.

Logical batches can be far larger than memory: ``train.max_physical_batch_size`` splits
each logical batch with Opacus's ``BatchMemoryManager``, which clips every physical batch
and adds noise once per logical batch. ``privacy.ffa_lora`` trains only LoRA B (FFA-LoRA,
Sun et al. 2024, https://arxiv.org/abs/2403.12313): fewer noised coordinates per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fedcpt.config import PrivacyConfig, TrainConfig
from fedcpt.core.lm_loss import next_token_loss
from fedcpt.core.model import AdaptedModel
from fedcpt.core.training import Anchor, TrainResult
from fedcpt.privacy.opacus_lib import BatchMemoryManager, PrivacyEngine

log = logging.getLogger(__name__)


class UnitPoissonSampler(Sampler[list[int]]):
    """Logical batches of *unit* indices: each unit is in a batch independently with
    probability ``q``, so it appears at most once per step.

    Written here because Opacus's ``UniformWithReplacementSampler`` samples dataset
    items; it cannot group items into units. The batch may be empty (a noise-only step).
    """

    def __init__(self, units: int, sample_rate: float, steps: int,
                 generator: torch.Generator) -> None:
        self.units, self.sample_rate, self.steps, self.generator = units, sample_rate, steps, \
            generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.rand(self.units, generator=self.generator) < self.sample_rate
            yield drawn.nonzero().flatten().tolist()


class OneBlockPerUnit(Dataset):
    """Item ``u`` is one block of unit ``u``, drawn uniformly (with the secret generator)."""

    def __init__(self, blocks: torch.Tensor, owners: torch.Tensor,
                 generator: torch.Generator) -> None:
        self.blocks, self.generator = blocks, generator
        order = torch.argsort(owners, stable=True)
        counts = torch.bincount(owners)
        self.starts = torch.cumsum(counts, 0) - counts
        self.counts, self.order = counts, order

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, unit: int) -> torch.Tensor:
        offset = int(torch.randint(int(self.counts[unit]), (1,), generator=self.generator))
        return self.blocks[self.order[self.starts[unit] + offset]]


def unit_sample_rate(units: int, batch_size: int) -> float:
    """q = expected logical batch / units (at most 1)."""
    return min(1.0, batch_size / units)


@contextlib.contextmanager
def _only_lora_b(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Freeze LoRA A for the duration (FFA-LoRA); the cached model is restored after."""
    frozen = [p for n, p in model.named_parameters()
              if enabled and "lora_A" in n and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def train_adapter_dp(
    lm: AdaptedModel,
    blocks: torch.Tensor,
    train: TrainConfig,
    privacy: PrivacyConfig,
    *,
    lr: float,
    noise_multiplier: float,
    sample_rate: float | None = None,
    anchor: Anchor | None = None,
    units: torch.Tensor | None = None,
) -> TrainResult:
    """Run ``train.local_steps`` unit-level DP-SGD steps (``privacy.optimizer``) on ``blocks``.

    ``units[i]`` is the unit of ``blocks[i]`` (default: every block its own unit).
    Sampling and noise use generators seeded from the OS's CSPRNG: noise derived from a
    public seed could be subtracted by anyone who knows it, so DP runs are deliberately not
    bit-reproducible. ``sample_rate``, if given, must be the rate the sampler uses (the
    one the ledger records).
    """
    owners = torch.arange(len(blocks)) if units is None else units
    n_units = int(owners.max()) + 1
    q = unit_sample_rate(n_units, train.batch_size)
    if sample_rate is not None and not math.isclose(q, sample_rate):
        raise RuntimeError(f"the unit sampler samples at q={q}, but the ledger would record "
                           f"q={sample_rate}")  # a bug, never user input
    model = lm.model
    model.train()
    # Which units are sampled must be as secret as the noise: both generators are seeded
    # from the OS's CSPRNG (the sampler stays on the CPU; the noise is drawn on the device).
    sampling = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=lm.device).manual_seed(secrets.randbits(63))
    loader = DataLoader(OneBlockPerUnit(blocks, owners, sampling),
                        batch_sampler=UnitPoissonSampler(n_units, q, train.local_steps,
                                                         sampling),
                        collate_fn=lambda items: _stack(items, blocks.shape[1]))
    with _only_lora_b(model, privacy.ffa_lora):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, privacy, train, lr,
                               noise_std=noise_multiplier * privacy.max_grad_norm
                               / (q * n_units))
        engine = PrivacyEngine(accountant="prv")  # its accountant is unused: the ledger counts
        with warnings.catch_warnings():
            # Opacus warns that a seeded generator is not secure_mode; ours is CSPRNG-seeded.
            warnings.filterwarnings("ignore", message=".*secure.*")
            dp_model, dp_optimizer, _ = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                poisson_sampling=False, noise_generator=noise,
                grad_sample_mode=privacy.grad_sample_mode)
        # Opacus derives the expected batch from a dataset of items; ours is q · units.
        dp_optimizer.expected_batch_size = q * n_units
        # Opacus's secure_mode noise: each coordinate is the sum of four Gaussian draws
        # over 2 (Holohan & Braghin 2021), which the floating-point attacks on a single
        # draw cannot invert. PrivacyEngine(secure_mode=True) would also swap our
        # generator for torchcsprng, which has no build for this torch; the flag is
        # DPOptimizer's own, and our generator is seeded from the OS's CSPRNG.
        dp_optimizer.secure_mode = True
        try:
            losses, examples, seconds = _run(lm, dp_model, dp_optimizer, loader,
                                             train.max_physical_batch_size, lr, anchor)
        finally:
            dp_model.cleanup()  # remove Opacus hooks: the cached model is reused next round
    model.eval()
    # The realised Poisson batch sizes depend on the data and are not released: the round
    # reports its logical size (steps × expected batch), equal at every site.
    nominal = train.local_steps * train.batch_size
    log.debug("DP round: %d units sampled for a logical %d", examples, nominal)
    return TrainResult(steps=train.local_steps, examples=nominal,
                       tokens=nominal * blocks.shape[1],
                       mean_loss=sum(losses) / max(1, len(losses)), seconds=seconds)


def _optimizer(params: list[torch.nn.Parameter], privacy: PrivacyConfig,
               train: TrainConfig, lr: float, noise_std: float) -> torch.optim.Optimizer:
    """``privacy.optimizer`` on the trainable parameters; ``noise_std``: the noise's std on
    each coordinate of the noised mean gradient, the unit of an ``sgd`` step."""
    if privacy.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    if noise_std <= 0:
        raise ValueError("privacy.optimizer = 'sgd' scales its step by the noise's std, "
                         "which is 0 here")  # σ is planned > 0; a bug, never user input
    return torch.optim.SGD(params, lr=lr / noise_std)


def _stack(items: list[torch.Tensor], block_size: int) -> torch.Tensor:
    return torch.stack(items) if items else torch.empty(0, block_size, dtype=torch.long)


def _run(lm: AdaptedModel, dp_model: torch.nn.Module, dp_optimizer, loader: DataLoader,
         physical: int, lr: float, anchor: Anchor | None,
         ) -> tuple[list[float], int, float]:
    """The steps; every physical batch is clipped, each logical batch noised once."""
    losses: list[float] = []
    examples = 0
    start = time.perf_counter()
    manager = (BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                  optimizer=dp_optimizer) if physical
               else contextlib.nullcontext(loader))
    with manager as batches:
        for batch in batches:  # (B, T), B varies under Poisson sampling
            if len(batch) == 0:
                _noise_only_step(dp_optimizer)
            else:
                batch = batch.to(lm.device)
                with lm.autocast():
                    # The decoder's LoRA layers carry Opacus' hooks; the head is frozen.
                    loss = next_token_loss(lm.model, batch)
                loss.backward()
                dp_optimizer.step()  # under BatchMemoryManager: clip only, until the last
                losses.append(loss.item())
                examples += len(batch)
            dp_optimizer.zero_grad(set_to_none=True)
            # Opacus marks physical batches that end no logical one as skipped steps.
            if anchor is not None and not getattr(dp_optimizer, "_is_last_step_skipped", False):
                anchor.pull(lr)
    return losses, examples, time.perf_counter() - start


def _noise_only_step(dp_optimizer) -> None:
    """An empty Poisson sample: the mechanism still releases σ·C Gaussian noise (scaled by
    the expected batch), so the update is the one the accountant analyses. Opacus clips
    an empty batch of per-sample gradients to a zero sum and adds the noise."""
    for p in dp_optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    dp_optimizer.step()
