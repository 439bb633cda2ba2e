"""fedcpt's client training step vs a plain transformers + peft loop, side by side.

Same model (SmolLM2-135M-Instruct), LoRA config, batch (8 × 128 tokens of Shakespeare),
optimizer and precision; the two loops alternate so machine drift hits both alike.
Reports tokens/s of each, their ratio (goal ≥ 0.95), and the upload per client per round
vs the full model (goal ≤ 0.005).

    python benchmarks/client_step.py --out results/client_step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from _common import interleaved, median, setup, write
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fedcpt.client.site import site_blocks
from fedcpt.config import load_config
from fedcpt.core import assets
from fedcpt.core.adapters import adapter_state, count_bytes, to_arrays
from fedcpt.core.model import load_adapted_model
from fedcpt.core.training import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a simulated client gets 1 CPU)")
    args = parser.parse_args()
    setup(args.threads)

    cfg = load_config("shakespeare")
    train = dataclasses.replace(cfg.train, local_steps=args.steps)
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    blocks = site_blocks(cfg.sites[0], cfg.model, cfg.data).train

    # The plain loop: the same model loaded with transformers, wrapped with peft directly.
    plain = AutoModelForCausalLM.from_pretrained(assets.smollm2_model_dir(), dtype=torch.float32)
    plain = get_peft_model(plain, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             target_modules=list(cfg.lora.target_modules),
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad],
                                  lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(0)
    dtype = lm.autocast_dtype

    def run_fedcpt() -> float:
        return train_adapter(lm, blocks, train, lr=cfg.train.lr, seed=0).seconds

    def run_plain() -> float:
        plain.train()
        start = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(len(blocks), (train.batch_size,), generator=generator)
            batch = blocks[idx]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = plain(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in plain.parameters() if p.requires_grad], 1.0)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    run_fedcpt(), run_plain()  # warm-up
    times = interleaved({"fedcpt": run_fedcpt, "plain": run_plain}, args.repeats)
    tokens = args.steps * train.batch_size * blocks.shape[1]
    tps = {name: tokens / median(t) for name, t in times.items()}
    upload = count_bytes(to_arrays(adapter_state(lm.model)))
    write(args.out, {
        "benchmark": "client_step",
        "model": cfg.model.name,
        "batch": [train.batch_size, blocks.shape[1]],
        "precision": "bf16 autocast" if dtype is not None else "fp32",
        "tokens_per_s": tps,
        "seconds_per_step": {n: median(t) / args.steps for n, t in times.items()},
        "ratio": tps["fedcpt"] / tps["plain"],
        "upload_bytes_per_client_round": upload,
        "full_model_bytes": lm.base_param_bytes,
        "upload_fraction": upload / lm.base_param_bytes,
    })


if __name__ == "__main__":
    main()
