"""Which base fits which GPU: a site step's memory, computed (no GPU needed; docs/gpu.md).

Per model shape (exact parameter counts from its config, built on the meta device):

- base weights: bf16 2 B per parameter; 4-bit NF4 with double quantisation 0.5 B per
  weight of a linear layer plus its constants (one fp8 absmax per 64 weights and one fp32
  per 256 of those: 0.127 bit per weight, QLoRA §2), the rest (embeddings, norms, LM head)
  fp32 as peft's ``prepare_model_for_kbit_training`` leaves it;
- LoRA (``lora.r``, ``lora.target_modules``): fp32 weight, gradient and AdamW's two
  moments, 16 B per parameter; DP-SGD adds Opacus' per-sample gradients, 4 B per parameter
  per example of the physical batch;
- activations: the bytes autograd saves for the backward pass per token, *measured* on
  this CPU at the model's real width (base in bf16, LoRA fp32, bf16 autocast: the GPU
  configuration; unique tensors, parameters excluded): per decoder layer as the difference
  of a two-layer and a one-layer model, plus what lies outside the layers;
- a fixed 1.5 GiB for the CUDA context, cuBLAS workspace and allocator slack (a guess,
  to be replaced by cuda_check.py's measured peaks).

    python benchmarks/gpu_memory.py --out results/gpu_memory.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from _common import write
from transformers import LlamaConfig, LlamaForCausalLM

from fedcpt.config import LoraSettings
from fedcpt.core.lm_loss import next_token_loss
from fedcpt.core.model import attach_lora

log = logging.getLogger("gpu_memory")

SHAPES = {
    "SmolLM2-135M": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "Llama-3.2-1B": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.2-3B": LlamaConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "Mistral-7B-v0.3": LlamaConfig(  # the same architecture
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "Llama-3.1-8B": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
GPUS_GIB = {"16 GB (T4, V100)": 16, "24 GB (L4, A10, RTX 4090)": 24,
            "40 GB (A100-40)": 40, "80 GB (A100-80, H100)": 80, "141 GB (H200)": 141}
OVERHEAD_GIB = 1.5
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits + double-quantised constants per weight
GIB = 2**30


def counts(shape: LlamaConfig, lora: LoraSettings) -> dict[str, int]:
    """Parameters of the linear layers, of the rest, and of the LoRA adapter."""
    with torch.device("meta"):
        model = LlamaForCausalLM(shape)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    total = sum(p.numel() for p in model.parameters())
    adapter = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules:
            adapter += lora.r * (module.in_features + module.out_features)
    return {"linear": linear, "other": total - linear, "total": total, "lora": adapter}


def saved_bytes_per_token(shape: LlamaConfig, lora: LoraSettings, seq: int,
                          layers: int) -> float:
    """Bytes autograd keeps for backward per token in a model of ``layers`` decoder layers
    of ``shape``'s width (measured)."""
    small = LlamaConfig(**{**shape.to_dict(), "num_hidden_layers": layers, "vocab_size": 256})
    torch.manual_seed(0)
    model = attach_lora(LlamaForCausalLM(small).to(torch.bfloat16), lora, seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, 256, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = next_token_loss(model, ids)
    del loss
    return sum(seen.values()) / seq


def activation_bytes(shape: LlamaConfig, lora: LoraSettings, seq: int) -> tuple[float, float]:
    """(per token per decoder layer, per token outside the layers): the difference of a
    two-layer and a one-layer model, and what remains of the one-layer one."""
    one = saved_bytes_per_token(shape, lora, seq, 1)
    per_layer = saved_bytes_per_token(shape, lora, seq, 2) - one
    return per_layer, one - per_layer


def site_gib(c: dict[str, int], act: tuple[float, float], layers: int, quantized: bool,
             dp: bool, batch: int, seq: int) -> float:
    weights = (c["linear"] * NF4_BYTES + c["other"] * 4) if quantized else c["total"] * 2
    lora = c["lora"] * (16 + (4 * batch if dp else 0))
    activations = (act[0] * layers + act[1]) * batch * seq
    return (weights + lora + activations) / GIB + OVERHEAD_GIB


def largest_batch(c, act, layers, quantized, dp, seq, gib) -> int:
    batch = 0
    while site_gib(c, act, layers, quantized, dp, batch + 1, seq) <= gib:
        batch += 1
        if batch >= 4096:
            break
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="batch of the memory column")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+",
                        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    lora = LoraSettings(r=args.rank, alpha=2 * args.rank, target_modules=tuple(args.targets))
    models = {}
    for name, shape in SHAPES.items():
        c = counts(shape, lora)
        per = activation_bytes(shape, lora, args.seq)
        log.info("%s: %s, saved bytes per token: %.0f per layer, %.0f outside", name, c, *per)
        rows = {}
        for quantized in (False, True):
            for dp in (False, True):
                key = f"{'4bit' if quantized else 'bf16'}_{'dp' if dp else 'plain'}"
                rows[key] = {
                    "gib_at_batch": site_gib(c, per, shape.num_hidden_layers, quantized, dp,
                                             args.batch, args.seq),
                    "largest_batch": {gpu: largest_batch(c, per, shape.num_hidden_layers,
                                                         quantized, dp, args.seq, gib)
                                      for gpu, gib in GPUS_GIB.items()}}
        models[name] = {"params": c, "saved_bytes_per_token_layer": per[0],
                        "saved_bytes_per_token_outside_layers": per[1], "rows": rows}
    write(args.out, {"benchmark": "gpu_memory", "computed": True, "seq": args.seq,
                     "batch": args.batch, "lora": {"r": lora.r, "targets": list(args.targets)},
                     "overhead_gib": OVERHEAD_GIB, "models": models})


if __name__ == "__main__":
    main()
