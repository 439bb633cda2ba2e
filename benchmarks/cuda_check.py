"""The GPU path of a site's step, checked and measured on a GPU machine (not in the suite).

1. Correctness: tiny-llama on ``cuda`` with its base in the GPU's default precision (bf16)
   and in 4-bit NF4: a plain and a DP-SGD local step (Opacus, noise drawn on the GPU) move
   the fp32 adapter, leave the base untouched, stay finite; the held-out evaluation runs.
2. Throughput: a SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model (random weights,
   saved from their configs and loaded through fedcpt's own loader: no download), LoRA as
   configured (default r=8 on q,v), base in bf16 and in 4-bit, plain and DP-SGD. The batch
   doubles until the GPU runs out of memory; each batch reports tokens/s, peak memory and
   model FLOP utilisation (MFU).

MFU counts the model FLOPs of a LoRA step on a frozen base: the forward (2 FLOPs per
weight per token, the LM head included, the embedding lookup not) and the backward's
input gradients (as many again; a frozen base computes no weight gradients), plus the
attention matmuls (4·L·T·d per token forward, twice that backward). LoRA's own FLOPs
(under 1%) and DP-SGD's per-sample work are not model FLOPs: DP shows as lower MFU. The
4-bit base is measured against the same bf16 peak (it dequantises and multiplies in bf16).

    python benchmarks/cuda_check.py --out results/cuda_check.json
    python benchmarks/cuda_check.py --quick --device cpu --peak-tflops 1 --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
from pathlib import Path

import torch
from _common import median, write
from transformers import LlamaConfig, LlamaForCausalLM

from fedcpt.config import LoraSettings, ModelConfig, PrivacyConfig, TrainConfig
from fedcpt.core.adapters import adapter_state
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, byte_tokenizer, load_adapted_model
from fedcpt.core.training import train_adapter
from fedcpt.privacy.dpsgd import train_adapter_dp

log = logging.getLogger("cuda_check")

SHAPES = {
    "smollm2_135m": LlamaConfig(  # the architecture of SmolLM2-135M-Instruct
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "llama_1b": LlamaConfig(  # the architecture of Llama-3.2-1B (1.24B parameters)
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True),
    "quick": LlamaConfig(  # --quick: the script's own check, on any device
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False),
}
# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts), TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0}


def base_state(lm: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" not in n}


def check_tiny(device: str, quantization: str) -> dict:
    """Correctness of one plain and one DP-SGD step on the device."""
    lm = load_adapted_model(ModelConfig(name="tiny-llama", device=device,
                                        quantization=quantization),
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
    lora_dtypes = {str(p.dtype) for p in lm.model.parameters() if p.requires_grad}
    ok = (moved(before, after_plain) > 0 and moved(after_plain, after_dp) > 0 and unchanged
          and on_device == {torch.device(device).type} and lora_dtypes == {"torch.float32"}
          and all(torch.isfinite(v).all() for v in after_dp.values()))
    out = {"ok": ok, "autocast": str(lm.autocast_dtype), "plain_loss": plain.mean_loss,
           "dp_steps": private.steps, "eval_loss": result.loss, "lora_dtypes": sorted(lora_dtypes),
           "adapter_moved_plain": moved(before, after_plain),
           "adapter_moved_dp": moved(after_plain, after_dp), "base_unchanged": unchanged,
           "devices": sorted(on_device)}
    _release()
    return out


def model_flops_per_token(shape: LlamaConfig, seq: int) -> float:
    """Forward + input-gradient backward FLOPs per token of a frozen base (see above)."""
    d, layers, kv = shape.hidden_size, shape.num_hidden_layers, shape.num_key_value_heads
    head = d // shape.num_attention_heads
    per_layer = d * d * 2 + 2 * d * kv * head + 3 * d * shape.intermediate_size  # q,o k,v mlp
    matmul_params = layers * per_layer + shape.vocab_size * d  # + LM head
    attention = 4 * layers * seq * d
    return 2 * (2 * matmul_params) + 3 * attention


def save_shape(shape: LlamaConfig, folder: Path) -> None:
    """Random weights in bf16 and the byte tokenizer, loadable as a local model folder."""
    torch.manual_seed(0)
    LlamaForCausalLM(shape).to(torch.bfloat16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def step_seconds(lm: AdaptedModel, vocab: int, batch: int, seq: int, steps: int,
                 dp: bool) -> float:
    """Median seconds per step of a local run (after a warm-up run)."""
    blocks = torch.randint(0, vocab, (max(4 * batch, 64), seq))
    train = TrainConfig(local_steps=steps, batch_size=batch)
    if dp:
        run = lambda: train_adapter_dp(  # noqa: E731
            lm, blocks, train, PrivacyConfig(enabled=True), lr=1e-4, noise_multiplier=1.0,
            sample_rate=batch / len(blocks))
    else:
        run = lambda: train_adapter(lm, blocks, train, lr=1e-4, seed=0)  # noqa: E731
    run()
    return median([run().seconds for _ in range(2)]) / steps


def sweep(name: str, folder: Path, quantization: str, args: argparse.Namespace,
          peak: float) -> dict:
    """Tokens/s, peak memory and MFU per batch, doubling until out of memory."""
    shape = SHAPES[name]
    cfg = ModelConfig(name=str(folder), device=args.device, quantization=quantization)
    lm = load_adapted_model(cfg, LoraSettings(), seed=0)
    flops = model_flops_per_token(shape, args.seq)
    rows: dict[str, list[dict]] = {"plain": [], "dp_sgd": []}
    for mode in rows:
        batch = 1
        while batch <= args.max_batch:
            try:
                _reset_peak(args.device)
                seconds = step_seconds(lm, shape.vocab_size, batch, args.seq, args.steps,
                                       dp=mode == "dp_sgd")
            except torch.OutOfMemoryError:
                log.info("%s %s %s: batch %d does not fit", name, quantization, mode, batch)
                break
            finally:
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            tokens = batch * args.seq / seconds
            row = {"batch": batch, "s_per_step": seconds, "tokens_per_s": tokens,
                   "mfu": tokens * flops / (peak * 1e12), "peak_gib": _peak_gib(args.device)}
            log.info("%s %s %s: %s", name, quantization, mode, row)
            rows[mode].append(row)
            batch *= 2
    largest = {mode: r[-1] for mode, r in rows.items() if r}
    out = {"flops_per_token": flops, "seq": args.seq, "rows": rows, "largest": largest}
    common = [p["batch"] for p in rows["plain"] if p["batch"] in
              {d["batch"] for d in rows["dp_sgd"]}]
    if common:  # DP-SGD's step against the plain one at the largest batch both fit
        b = max(common)
        plain = next(r for r in rows["plain"] if r["batch"] == b)["s_per_step"]
        private = next(r for r in rows["dp_sgd"] if r["batch"] == b)["s_per_step"]
        out["dp_over_plain"] = {"batch": b, "ratio": private / plain}
    del lm
    _release()
    return out


def _release() -> None:
    load_adapted_model.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def peak_tflops(device: str, given: float) -> tuple[float, str]:
    if given:
        return given, "given"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{key} dense bf16 data-sheet peak"
    raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=512, help="tokens per block")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=["smollm2_135m", "llama_1b"],
                        choices=sorted(SHAPES))
    parser.add_argument("--quantization", nargs="+", default=["none", "4bit"],
                        choices=["none", "4bit"])
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="bf16 peak of the device (default: from its name)")
    parser.add_argument("--quick", action="store_true",
                        help="the script's own check: a tiny shape, short blocks, batch <= 4")
    args = parser.parse_args()
    if args.quick:
        args.models, args.seq, args.max_batch, args.steps = ["quick"], 32, 4, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    peak, peak_source = peak_tflops(args.device, args.peak_tflops)
    payload = {"benchmark": "cuda_check", "device": args.device,
               "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                               else "cpu"),
               "peak_bf16_tflops": peak, "peak_source": peak_source,
               "tiny": {q: check_tiny(args.device, q) for q in args.quantization}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = Path(tmp) / name
            save_shape(SHAPES[name], folder)
            payload[name] = {q: sweep(name, folder, q, args, peak) for q in args.quantization}
    payload["ok"] = all(t["ok"] for t in payload["tiny"].values())
    write(args.out, payload)
    if not payload["ok"]:
        raise SystemExit("CUDA check failed")


if __name__ == "__main__":
    main()
