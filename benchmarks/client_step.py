"""fedcpt's client training step vs a plain transformers + peft loop, side by side.

Same model (SmolLM2-135M-Instruct), LoRA config, batch (8 × 128 tokens of Shakespeare),
optimizer and precision; the two loops alternate so machine drift hits both alike.
Reports seconds per step of each and their ratio (goal: fedcpt / plain ≤ 1.0), the
FLOP utilisation (FLOPs a step executes, counted by torch's FlopCounterMode, per second,
over the peak FLOP/s of the detected CPU class in the step's precision, fp32 or bf16;
goal ≥ 0.5), where a step's time goes
(torch.profiler, ``--profile``), and the upload per client per round vs the full model.

On a shared machine wall time is inflated by other processes; with one thread the
process CPU time per step is reported beside it and is the steadier number.

    python benchmarks/client_step.py --out results/client_step.json [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch
from _common import (
    cpu_class,
    interleaved,
    load_average,
    measured_sgemm_flops,
    median,
    peak_flops,
    setup,
    write,
)
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from fedcpt.client.site import site_blocks
from fedcpt.config import load_config
from fedcpt.core import assets
from fedcpt.core.adapters import adapter_state, count_bytes, to_arrays
from fedcpt.core.model import load_adapted_model
from fedcpt.core.training import train_adapter

_ELEMENTWISE = ("mul", "add", "sub", "div", "silu", "pow", "rsqrt", "mean", "neg", "cat",
                "copy_", "fill_", "sum", "where", "index", "gather", "scatter", "exp")


def _category(name: str, shapes: list, vocab: int) -> str:
    """Where an aten op's time belongs: head (vocab-wide), attention, matmul, ..."""
    if any(vocab in s for s in shapes if isinstance(s, list)):
        return "head + cross-entropy (vocab-wide ops)"
    if "scaled_dot_product" in name:
        return "attention (SDPA)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul (q/k/v/o, MLP, LoRA)"
    if "foreach" in name or "adam" in name or "norm" in name and "linalg" in name:
        return "optimizer + clipping"
    if any(key in name for key in _ELEMENTWISE):
        return "elementwise (norms, RoPE, SiLU, residuals)"
    return "other"


def breakdown(step, vocab: int) -> dict[str, float]:
    """Fraction of self CPU time per category over two profiled steps."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        totals[_category(event.key, event.input_shapes or [], vocab)] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {k: round(v / whole, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a simulated client gets 1 CPU)")
    parser.add_argument("--fp32", action="store_true",
                        help="force fp32 (stand in for an AVX2 CPU on an AMX machine)")
    parser.add_argument("--profile", action="store_true", help="add a time breakdown")
    args = parser.parse_args()
    setup(args.threads)
    load_before = load_average()

    overrides = ["model.precision=fp32"] if args.fp32 else []
    cfg = load_config("shakespeare-fedavg", overrides=overrides)
    train = dataclasses.replace(cfg.train, local_steps=args.steps)
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    blocks = site_blocks(cfg.sites[0], cfg.model, cfg.data).train
    vocab = lm.model.get_base_model().config.vocab_size

    # The plain loop: the same model loaded with transformers, wrapped with peft directly.
    plain = AutoModelForCausalLM.from_pretrained(assets.smollm2_model_dir(), dtype=torch.float32)
    plain = get_peft_model(plain, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             target_modules=list(cfg.lora.target_modules),
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    plain_params = [p for p in plain.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(plain_params, lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(0)
    dtype = lm.autocast_dtype
    cpu_seconds: dict[str, list[float]] = defaultdict(list)

    def run_fedcpt(steps: int = args.steps) -> float:
        start = time.process_time()
        seconds = train_adapter(lm, blocks, dataclasses.replace(train, local_steps=steps),
                                lr=cfg.train.lr, seed=0).seconds
        cpu_seconds["fedcpt"].append(time.process_time() - start)
        return seconds

    def run_plain(steps: int = args.steps) -> float:
        plain.train()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            idx = torch.randint(len(blocks), (train.batch_size,), generator=generator)
            batch = blocks[idx]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = plain(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain_params, 1.0)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        cpu_seconds["plain"].append(time.process_time() - cpu)
        return time.perf_counter() - start

    counter = FlopCounterMode(display=False)
    with counter:
        run_fedcpt(1)  # also the warm-up
    flops_per_step = counter.get_total_flops()
    run_plain(1)
    cpu_seconds.clear()
    times = interleaved({"fedcpt": run_fedcpt, "plain": run_plain}, args.repeats)
    wall = {n: median(t) / args.steps for n, t in times.items()}
    cpu = {n: median(t) / args.steps for n, t in cpu_seconds.items()}
    # With one thread, CPU time is compute time; wall time also counts waiting for a core.
    best = {n: min(wall[n], cpu[n]) if args.threads == 1 else wall[n] for n in wall}
    machine = cpu_class()
    peak, derivation = peak_flops(args.threads, machine, bf16=dtype is not None)
    achieved = flops_per_step / best["fedcpt"]
    sgemm = measured_sgemm_flops(args.threads)
    upload = count_bytes(to_arrays(adapter_state(lm.model)))
    payload = {
        "benchmark": "client_step",
        "model": cfg.model.name,
        "batch": [train.batch_size, blocks.shape[1]],
        "precision": "bf16 autocast" if dtype is not None else "fp32",
        "cpu_class": machine,
        "seconds_per_step": wall,
        "cpu_seconds_per_step": cpu,
        "step_time_ratio": best["fedcpt"] / best["plain"],
        "tokens_per_s": {n: train.batch_size * blocks.shape[1] / s for n, s in best.items()},
        "flop_per_step": flops_per_step,
        "achieved_flop_per_s": achieved,
        "peak_flop_per_s": peak,
        "peak_derivation": derivation,
        "flop_utilisation": achieved / peak,
        "sgemm_flop_per_s": sgemm,
        "utilisation_of_measured_sgemm": achieved / sgemm,
        "upload_bytes_per_client_round": upload,
        "full_model_bytes": lm.base_param_bytes,
        "upload_fraction": upload / lm.base_param_bytes,
        "load_average": [load_before, load_average()],
    }
    if args.profile:
        payload["time_breakdown"] = {"fedcpt": breakdown(lambda: run_fedcpt(2), vocab),
                                     "plain": breakdown(lambda: run_plain(2), vocab)}
    write(args.out, payload)


if __name__ == "__main__":
    main()
