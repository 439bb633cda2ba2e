"""DP-SGD on the LoRA parameters with Opacus (Abadi et al., 2016).

A record is one packed training block. Each step samples blocks by Poisson sampling at
rate ``q = batch_size / N``, clips every block's gradient to ``max_grad_norm`` and adds
Gaussian noise of std ``σ · max_grad_norm`` — the mechanism the accountant assumes.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedcpt.config import PrivacyConfig, TrainConfig
from fedcpt.core.lm_loss import next_token_loss
from fedcpt.core.model import AdaptedModel
from fedcpt.core.training import Anchor, TrainResult

log = logging.getLogger(__name__)


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
) -> TrainResult:
    """Run ``train.local_steps`` DP-SGD (AdamW) steps on ``blocks``; returns what it did.

    Sampling and noise use generators seeded from the OS's CSPRNG: noise derived from a
    public seed could be subtracted by anyone who knows it, so DP runs are deliberately not
    bit-reproducible. ``sample_rate``, if given, is checked against the rate Opacus
    actually samples at (the one the ledger records).
    """
    model = lm.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    # Which records are sampled must be as secret as the noise: both generators are seeded
    # from the OS's CSPRNG (the sampler stays on the CPU; the noise is drawn on the device).
    sampling = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=lm.device).manual_seed(secrets.randbits(63))
    loader = DataLoader(TensorDataset(blocks), batch_size=train.batch_size, generator=sampling)
    engine = PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():
        # Opacus warns that a seeded generator is not secure_mode; ours is CSPRNG-seeded.
        warnings.filterwarnings("ignore", message=".*secure.*")
        dp_model, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True, noise_generator=noise,
            grad_sample_mode=privacy.grad_sample_mode,
        )
    if sample_rate is not None and not math.isclose(dp_loader.sample_rate, sample_rate):
        dp_model.cleanup()
        raise RuntimeError(f"Opacus samples at q={dp_loader.sample_rate}, but the ledger "
                           f"would record q={sample_rate}")  # a bug, never user input
    dp_model.train()
    losses: list[float] = []
    examples = 0
    start = time.perf_counter()
    batches = iter(dp_loader)
    try:
        for _ in range(train.local_steps):
            try:
                (batch,) = next(batches)
            except StopIteration:
                batches = iter(dp_loader)
                (batch,) = next(batches)
            if len(batch) == 0:
                # An empty Poisson sample: skipping the release is covered by the
                # accountant, which still counts this step (it can only over-count).
                continue
            batch = batch.to(lm.device)  # (B, T), B varies under Poisson sampling
            with lm.autocast():
                # The decoder's LoRA layers carry Opacus' hooks; the head is frozen.
                loss = next_token_loss(model, batch)
            loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
            if anchor is not None:
                anchor.pull(lr)
            losses.append(loss.item())
            examples += len(batch)
    finally:
        dp_model.cleanup()  # remove Opacus hooks: the cached model is reused next round
    model.eval()
    # The realised Poisson batch sizes depend on the data and are not released: the round
    # reports its logical size (steps × expected batch), equal at every site.
    nominal = train.local_steps * train.batch_size
    log.debug("DP round: %d examples sampled for a logical %d", examples, nominal)
    return TrainResult(
        steps=train.local_steps,
        examples=nominal,
        tokens=nominal * blocks.shape[1],
        mean_loss=sum(losses) / max(1, len(losses)),
        seconds=time.perf_counter() - start,
    )
