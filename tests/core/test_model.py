"""Model loading: the tiny built-in Llama wrapped with LoRA, cached per process, and errors."""

from __future__ import annotations

import io

import pytest
import torch
from peft import PeftModel

from fedcpt.config import LoraSettings, ModelConfig
from fedcpt.core.assets import gguf_progress_on_terminals_only
from fedcpt.core.model import (
    AdaptedModel,
    byte_tokenizer,
    load_adapted_model,
    load_base_model,
    load_tokenizer,
    resolve_device,
)
from fedcpt.exceptions import ModelError

TINY = ModelConfig(name="tiny-llama", precision="fp32")
LORA = LoraSettings(r=4, alpha=8)


def test_adapted_model_trains_only_lora():
    lm = load_adapted_model(TINY, LORA, seed=0)
    assert isinstance(lm, AdaptedModel)
    assert isinstance(lm.model, PeftModel)
    assert lm.device == torch.device("cpu")
    assert lm.autocast_dtype is None  # fp32 means no autocast
    params = dict(lm.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if "lora_" in n}
    assert trainable  # there is something to train
    # LoRA on q_proj and v_proj of both layers: one A and one B each
    assert len(trainable) == 2 * 2 * 2
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)


def test_adapted_model_is_loaded_once_per_process():
    first = load_adapted_model(TINY, LORA, seed=0)
    again = load_adapted_model(ModelConfig(name="tiny-llama", precision="fp32"),
                               LoraSettings(r=4, alpha=8), seed=0)
    assert again is first
    other = load_adapted_model(TINY, LoraSettings(r=2, alpha=4), seed=0)
    assert other is not first


def test_base_param_bytes_counts_base_weights_only():
    lm = load_adapted_model(TINY, LORA, seed=0)
    base = sum(p.numel() for n, p in lm.model.named_parameters() if "lora_" not in n)
    assert lm.base_param_bytes == 4 * base


def test_tiny_model_uses_byte_tokenizer():
    tok = load_tokenizer(TINY)
    assert len(tok) == 257
    assert tok.eos_token_id == 256
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("héllo".encode())  # one token per UTF-8 byte
    assert tok.eos_token_id not in ids
    assert tok.decode(ids) == "héllo"
    assert len(byte_tokenizer()) == 257


def test_lora_seed_sets_initial_adapter():
    from fedcpt.core.adapters import adapter_state
    from fedcpt.core.model import attach_lora, tiny_llama

    a = adapter_state(attach_lora(tiny_llama(257), LORA, seed=1))
    b = adapter_state(attach_lora(tiny_llama(257), LORA, seed=1))
    c = adapter_state(attach_lora(tiny_llama(257), LORA, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


def test_unknown_model_name():
    with pytest.raises(ModelError, match=r"model 'no-such-model-xyz'"):
        load_adapted_model(ModelConfig(name="no-such-model-xyz"), LORA, seed=0)


def test_missing_local_model_dir(tmp_path):
    missing = tmp_path / "models" / "mine"
    with pytest.raises(ModelError, match=r"model directory not found: .*models/mine"):
        load_adapted_model(ModelConfig(name=str(missing)), LORA, seed=0)


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "weights.gguf"
    with pytest.raises(ModelError, match=r"GGUF file not found: .*weights\.gguf"):
        load_base_model(ModelConfig(name=str(missing)))


def test_bad_lora_target_module():
    with pytest.raises(ModelError,
                       match=r"lora\.target_modules \['qkv_proj'\] not found in the model"):
        load_adapted_model(TINY, LoraSettings(r=4, alpha=8, target_modules=("q_proj",
                                                                            "qkv_proj")),
                           seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ModelError, match=r"model\.device is 'cuda' but no CUDA device"):
        resolve_device(ModelConfig(name="tiny-llama", device="cuda"))


def _gguf_bar(stream) -> str:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...",
                             file=stream):
        pass
    return stream.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_gguf_conversion_bar_stays_out_of_logs_and_pipes():
    """transformers' GGUF reader calls tqdm itself; during the conversion its bar is shown
    on a terminal and nowhere else (a log file, CI's pipe, the streamed run.log)."""
    assert "GGUF" in _gguf_bar(io.StringIO())  # transformers alone prints it into a pipe
    with gguf_progress_on_terminals_only():
        assert _gguf_bar(io.StringIO()) == ""
        assert "GGUF" in _gguf_bar(_Terminal())
    assert "GGUF" in _gguf_bar(io.StringIO())  # restored afterwards
