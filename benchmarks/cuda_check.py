"""The CUDA path of a site's step, checked on a GPU machine (not part of the test suite).

1. tiny-llama on ``cuda`` with bf16 autocast: a plain and a DP-SGD local step (Opacus,
   noise drawn on the GPU) move the adapter, leave the base untouched, stay finite; the
   held-out evaluation runs.
2. A SmolLM2-135M-shaped Llama (random weights, built from its config: no download) with
   LoRA r=8 on q,v: seconds per 8×128-token step in fp32 and bf16, plain and DP-SGD.

    python benchmarks/cuda_check.py --out results/cuda_check.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import median, write
from transformers import LlamaConfig, LlamaForCausalLM

from fedcpt.config import LoraSettings, ModelConfig, PrivacyConfig, TrainConfig
from fedcpt.core.adapters import adapter_state
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, attach_lora, byte_tokenizer, load_adapted_model
from fedcpt.core.training import train_adapter
from fedcpt.privacy.dpsgd import train_adapter_dp

SMOLLM2_135M = LlamaConfig(  # the architecture of SmolLM2-135M-Instruct
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def base_state(lm: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" not in n}


def check_tiny(device: str) -> dict:
    """Correctness of one plain and one DP-SGD step on the device."""
    lm = load_adapted_model(ModelConfig(name="tiny-llama", device=device, precision="auto"),
                            LoraSettings(r=4, alpha=8), seed=0)
    blocks = torch.randint(0, 256, (64, 64))
    train = TrainConfig(local_steps=3, batch_size=8)
    before, base = adapter_state(lm.model), base_state(lm)
    plain = train_adapter(lm, blocks, train, lr=1e-2, seed=0)
    after_plain = adapter_state(lm.model)
    private = train_adapter_dp(lm, blocks, train, PrivacyConfig(enabled=True), lr=1e-2,
                               noise_multiplier=1.0, sample_rate=8 / 64)
    after_dp = adapter_state(lm.model)
    moved = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)  # noqa: E731
    unchanged = all(torch.equal(base[n], p) for n, p in lm.model.named_parameters()
                    if "lora_" not in n)
    result = evaluate_blocks(lm, blocks[:16], 8)
    on_device = {p.device.type for p in lm.model.parameters()}
    ok = (moved(before, after_plain) > 0 and moved(after_plain, after_dp) > 0 and unchanged
          and on_device == {torch.device(device).type}
          and all(torch.isfinite(v).all() for v in after_dp.values()))
    return {"ok": ok, "autocast": str(lm.autocast_dtype), "plain_loss": plain.mean_loss,
            "dp_steps": private.steps, "eval_loss": result.loss,
            "adapter_moved_plain": moved(before, after_plain),
            "adapter_moved_dp": moved(after_plain, after_dp), "base_unchanged": unchanged,
            "devices": sorted(on_device)}


def time_smollm2(device: str, steps: int) -> dict:
    """Seconds per 8×128-token LoRA step of a SmolLM2-135M-shaped model."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(SMOLLM2_135M).to(device)
    peft = attach_lora(model, LoraSettings(), seed=0).to(device)
    blocks = torch.randint(0, SMOLLM2_135M.vocab_size, (256, 128))
    train = TrainConfig(local_steps=steps, batch_size=8)
    out = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        lm = AdaptedModel(peft, byte_tokenizer(), torch.device(device), dtype)
        for name, seconds in _step_seconds(lm, blocks, train).items():
            out[f"{precision}_{name}_s_per_step"] = seconds
            out[f"{precision}_{name}_tokens_per_s"] = 8 * 128 / seconds
    return out


def _step_seconds(lm: AdaptedModel, blocks: torch.Tensor, train: TrainConfig,
                  ) -> dict[str, float]:
    """Median seconds per step (after a warm-up) of a plain and a DP-SGD local run."""
    n = len(blocks)
    runs = {"plain": lambda: train_adapter(lm, blocks, train, lr=1e-3, seed=0),
            "dp_sgd": lambda: train_adapter_dp(lm, blocks, train, PrivacyConfig(enabled=True),
                                               lr=1e-3, noise_multiplier=1.0,
                                               sample_rate=train.batch_size / n)}
    seconds = {}
    for name, run in runs.items():
        run()
        seconds[name] = median([run().seconds for _ in range(3)]) / train.local_steps
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    payload = {"benchmark": "cuda_check", "device": args.device,
               "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                               else "cpu"),
               "tiny": check_tiny(args.device), "smollm2_135m_shape":
               time_smollm2(args.device, args.steps)}
    payload["ok"] = payload["tiny"]["ok"]
    write(args.out, payload)
    if not payload["ok"]:
        raise SystemExit("CUDA check failed")


if __name__ == "__main__":
    main()
