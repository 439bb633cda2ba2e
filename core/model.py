"""Load a causal LM, wrap it with LoRA, and pick device and precision.

The frozen base is stored in ``model.base_dtype`` (bf16 on a GPU by default, fp32 on a CPU)
or, with ``model.quantization = "4bit"``, in 4-bit NF4 (QLoRA, through bitsandbytes and
peft's k-bit preparation). The LoRA weights, and so the optimiser state and everything
that travels, are fp32 whatever the base.

The wrapped model is cached per process (:func:`load_adapted_model`): Flower's Ray
workers are reused across rounds, so the base model is loaded once per worker, and each
message only swaps adapter tensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedcpt.config import LoraSettings, ModelConfig
from fedcpt.core import assets
from fedcpt.core.adapters import adapter_state, to_arrays
from fedcpt.exceptions import ConfigError, ModelError

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


def resolve_base_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The frozen base's storage dtype: as configured, or bf16 on CUDA (fp16 on a GPU
    without bf16) and fp32 on a CPU."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.base_dtype in named:
        return named[cfg.base_dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(cfg: ModelConfig, device: torch.device) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit NF4 with double quantisation, computing in the autocast precision
    (fp16 on a GPU without bf16, else fp32); None without ``model.quantization``."""
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization = '4bit' needs bitsandbytes, which is not "
                          "installed: pip install 'fedcpt[quantization]'")
    compute = resolve_autocast(cfg, device)
    if compute is None:
        compute = (torch.float16 if device.type == "cuda" and cfg.precision != "fp32"
                   else torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


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


def load_base_model(cfg: ModelConfig, device: torch.device | None = None,
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load base weights and tokenizer; raises ModelError naming the model on failure.

    The base is on the CPU in its storage dtype, or, quantised, already on ``device``
    (default: the configured one), prepared for k-bit training as peft documents."""
    device = device or resolve_device(cfg)
    tokenizer = load_tokenizer(cfg)
    quantization = quantization_config(cfg, device)
    if cfg.name == TINY_MODEL:
        model = tiny_llama(len(tokenizer))
        if quantization is None:
            return model.to(resolve_base_dtype(cfg, device)), tokenizer
        with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantises while loading
            model.save_pretrained(tmp)
            return _quantized(cfg, tmp, {}, quantization, device), tokenizer
    source, kwargs = _pretrained_source(cfg)
    if quantization is not None:
        return _quantized(cfg, source, kwargs, quantization, device), tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_base_dtype(cfg, device), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"unknown or unloadable model {cfg.name!r} (built-ins: {', '.join(BUILTIN_MODELS)};"
            f" or a hub id, local directory or .gguf path): {err}") from None
    return model, tokenizer


def _quantized(cfg: ModelConfig, source: str, kwargs: dict,
               quantization: BitsAndBytesConfig, device: torch.device) -> PreTrainedModel:
    """The base in 4-bit NF4 on ``device``, its other layers fp32 and frozen (peft's
    ``prepare_model_for_kbit_training``, without gradient checkpointing: Opacus' per-sample
    hooks need each layer's activations)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization, device_map={"": str(device)}, **kwargs)
    except (ImportError, OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"cannot load model {cfg.name!r} in 4-bit on {device.type} "
                         f"(bitsandbytes): {err}") from None
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def attach_lora(model: PreTrainedModel, lora: LoraSettings, seed: int) -> PeftModel:
    """Freeze the base and add LoRA adapters (A random from ``seed``, B zero), in fp32
    whatever the base's dtype."""
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
        return get_peft_model(model, peft_config, autocast_adapter_dtype=True)


@functools.lru_cache(maxsize=2)
def load_adapted_model(model_cfg: ModelConfig, lora: LoraSettings, seed: int) -> AdaptedModel:
    """Base model + LoRA, on its device, once per process for a given configuration."""
    device = resolve_device(model_cfg)
    base, tokenizer = load_base_model(model_cfg, device)
    # Move before wrapping: LoRA weights created after a move can silently stay on the old
    # device and never update under Opacus (opacus#820). A quantised base is loaded there.
    if model_cfg.quantization == "none":
        base.to(device)
    peft_model = attach_lora(base, lora, seed)
    peft_model.to(device)
    dtype = resolve_autocast(model_cfg, device)
    base_kind = ("4-bit NF4" if model_cfg.quantization == "4bit"
                 else str(resolve_base_dtype(model_cfg, device)).removeprefix("torch."))
    log.info("Loaded %s on %s (base %s, %s, %d torch threads), %d trainable of %d "
             "parameters", model_cfg.name, device, base_kind,
             "bf16 autocast" if dtype else "no autocast", torch.get_num_threads(),
             *_param_counts(peft_model))
    return AdaptedModel(peft_model, tokenizer, device, dtype)


def _param_counts(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
