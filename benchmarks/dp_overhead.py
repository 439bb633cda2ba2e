"""DP-SGD step time vs non-private step time on SmolLM2-135M LoRA, side by side.

Same model, data, logical batch (expected 8 × 128 tokens under Poisson sampling) and
precision; the two alternate. Reports seconds per step and the ratio (goal ≤ 1.15).

    python benchmarks/dp_overhead.py --out results/dp_overhead.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from _common import interleaved, median, setup, write

from fedcpt.client.site import site_blocks
from fedcpt.config import PrivacyConfig, load_config
from fedcpt.core.model import load_adapted_model
from fedcpt.core.training import train_adapter
from fedcpt.privacy.dpsgd import train_adapter_dp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grad-sample-mode", default="hooks")
    args = parser.parse_args()
    setup(args.threads)

    cfg = load_config("shakespeare-fedavg")
    train = dataclasses.replace(cfg.train, local_steps=args.steps)
    privacy = PrivacyConfig(enabled=True, grad_sample_mode=args.grad_sample_mode)
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    blocks = site_blocks(cfg.sites[0], cfg.model, cfg.data).train

    def plain() -> float:
        return train_adapter(lm, blocks, train, lr=cfg.train.lr, seed=0).seconds

    def private() -> float:
        return train_adapter_dp(lm, blocks, train, privacy, lr=cfg.train.lr,
                                noise_multiplier=1.0).seconds

    plain(), private()  # warm-up
    times = interleaved({"non_private": plain, "dp_sgd": private}, args.repeats)
    per_step = {name: median(t) / args.steps for name, t in times.items()}
    write(args.out, {
        "benchmark": "dp_overhead",
        "model": cfg.model.name,
        "grad_sample_mode": args.grad_sample_mode,
        "expected_batch": [train.batch_size, blocks.shape[1]],
        "seconds_per_step": per_step,
        "ratio": per_step["dp_sgd"] / per_step["non_private"],
    })


if __name__ == "__main__":
    main()
