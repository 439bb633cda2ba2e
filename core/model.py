"""Load a causal LM, wrap it with LoRA, and pick device and precision.

The wrapped model is cached per process (:func:`load_adapted_model`): Flower's Ray
workers are reused across rounds, so the base model is loaded once per worker, and each
message only swaps adapter tensors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedcpt.config import LoraSettings, ModelConfig
from fedcpt.core import assets
from fedcpt.core.adapters import adapter_state, to_arrays
from fedcpt.exceptions import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
BUILTIN_MODELS = (DEFAULT_MODEL, TINY_MODEL)


@dataclass
class AdaptedModel:
    """A LoRA-wrapped causal LM with its tokenizer and how to run it."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    autocast_dtype: torch.dtype | None
    initial_adapter: ArrayRecord | None = None
    """The adapter as created (A random, B zero): where every run starts. The model's
    current adapter changes with every message, so it is not a starting point."""

    def __post_init__(self) -> None:
        if self.initial_adapter is None:
            self.initial_adapter = to_arrays(adapter_state(self.model))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def base_param_bytes(self) -> int:
        """Bytes of the base model's parameters (what a full-model upload would cost)."""
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                   if "lora_" not in n)


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_autocast(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively, else full fp32."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_supports_bf16()
    if cfg.precision == "bf16" and not supported:
        raise ModelError(f"model.precision is 'bf16' but {device.type} has no native bf16")
    return torch.bfloat16 if supported else None


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 257-token byte-level tokenizer (256 bytes + EOS) built in code: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<eos>"})
    return fast


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """A 2-layer, 64-wide Llama with fixed random weights, for tests and smoke runs."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with ``cfg`` (cheap; data loading uses it alone)."""
    if cfg.name == TINY_MODEL:
        return byte_tokenizer()
    source, kwargs = _pretrained_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer for model {cfg.name!r}: {err}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer of {cfg.name!r} has no EOS token to separate documents")
    return tokenizer


def _pretrained_source(cfg: ModelConfig) -> tuple[str, dict]:
    if cfg.name == DEFAULT_MODEL:
        return str(assets.smollm2_model_dir()), {}
    path = Path(cfg.name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    looks_local = path.is_absolute() or cfg.name.startswith(".") or cfg.name.count("/") > 1
    if looks_local and not path.exists():
        raise ModelError(f"model directory not found: {path}")
    return cfg.name, kwargs


def load_base_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load base weights and tokenizer; raises ModelError naming the model on failure."""
    tokenizer = load_tokenizer(cfg)
    if cfg.name == TINY_MODEL:
        return tiny_llama(len(tokenizer)), tokenizer
    source, kwargs = _pretrained_source(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"unknown or unloadable model {cfg.name!r} (built-ins: {', '.join(BUILTIN_MODELS)};"
            f" or a hub id, local directory or .gguf path): {err}") from None
    return model, tokenizer


def attach_lora(model: PreTrainedModel, lora: LoraSettings, seed: int) -> PeftModel:
    """Freeze the base and add LoRA adapters (A random from ``seed``, B zero)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise ModelError(f"lora.target_modules {missing} not found in the model; "
                         f"linear layers include e.g. q_proj, k_proj, v_proj, o_proj")
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config)


@functools.lru_cache(maxsize=2)
def load_adapted_model(model_cfg: ModelConfig, lora: LoraSettings, seed: int) -> AdaptedModel:
    """Base model + LoRA, on its device, once per process for a given configuration."""
    device = resolve_device(model_cfg)
    base, tokenizer = load_base_model(model_cfg)
    # Move before wrapping: LoRA weights created after a move can silently stay on the old
    # device and never update under Opacus (opacus#820).
    base.to(device)
    peft_model = attach_lora(base, lora, seed)
    peft_model.to(device)
    dtype = resolve_autocast(model_cfg, device)
    log.info("Loaded %s on %s (%s, %d torch threads), %d trainable of %d parameters",
             model_cfg.name, device, "bf16 autocast" if dtype else "fp32",
             torch.get_num_threads(), *_param_counts(peft_model))
    return AdaptedModel(peft_model, tokenizer, device, dtype)


def _param_counts(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
