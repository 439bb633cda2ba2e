"""Seconds for one site to noise one SmolLM2-135M LoRA update under distributed DP.

The update has the default scenario's adapter size (rank 8 on q_proj and v_proj,
counted by attaching it to a SmolLM2-135M-shaped model on the meta device: 460,800
coordinates); ``DistributedDP.noised`` clips, rounds and adds OpenDP's exact discrete
Gaussian at the default ``privacy.user_*`` settings for 5 sites, threshold 3. Wall and
process-CPU seconds per call, the rounding alone beside it, and the load average.

    python benchmarks/ddp_noise.py --out results/ddp_noise.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import cpu_class, load_average, median, setup, write
from gpu_memory import SHAPES
from transformers import LlamaForCausalLM

from fedcpt.config import LoraSettings, PrivacyConfig, SecAggConfig
from fedcpt.core.model import attach_lora
from fedcpt.privacy.secagg.ddp import DistributedDP

log = logging.getLogger("ddp_noise")


def adapter_size() -> int:
    """Trainable LoRA coordinates of the default adapter on SmolLM2-135M."""
    with torch.device("meta"):
        model = attach_lora(LlamaForCausalLM(SHAPES["SmolLM2-135M"]), LoraSettings(), 0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    setup(1)
    dimension = adapter_size()
    privacy, secagg = PrivacyConfig(), SecAggConfig()
    plan = DistributedDP.for_round(
        clip=privacy.user_clipping_norm, noise_multiplier=privacy.user_noise_multiplier,
        sites=5, threshold=3, dishonest_fraction=secagg.dishonest_fraction,
        dimension=dimension)
    update = np.random.default_rng(0).normal(size=dimension) * 1e-3
    load_before = load_average()
    rounding = [timed(lambda: plan.rounded(update)) for _ in range(args.repeats)]
    noising = [timed(lambda: plan.noised(update)) for _ in range(args.repeats)]
    log.info("noised: %s", noising)
    write(args.out, {
        "benchmark": "ddp_noise", "coordinates": dimension, "site_sigma": plan.site_sigma,
        "sampler": "OpenDP make_gaussian, i64 vector, L2 (exact, its own CSPRNG)",
        "rounded_s": {"wall": median([w for w, _ in rounding]),
                      "cpu": median([c for _, c in rounding])},
        "noised_s": {"wall": median([w for w, _ in noising]),
                     "cpu": median([c for _, c in noising])},
        "noised_runs_wall_cpu_s": noising,
        "cpu_class": cpu_class(), "load_average_before_after": [load_before, load_average()],
    })


if __name__ == "__main__":
    main()
