"""Bases that fit: the frozen base in bf16/fp16 or 4-bit NF4 (QLoRA, bitsandbytes' CPU
backend), the LoRA weights fp32; plain and DP-SGD steps move only the adapter, and the
adapter that travels has the fp32 base's keys, shapes and dtypes."""

from __future__ import annotations

import sys

import pytest
import torch

from fedcpt.config import LoraSettings, ModelConfig, PrivacyConfig, TrainConfig, load_config
from fedcpt.core.adapters import adapter_state
from fedcpt.core.model import (
    load_adapted_model,
    load_base_model,
    quantization_config,
    resolve_base_dtype,
)
from fedcpt.core.training import train_adapter
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.dpsgd import train_adapter_dp

LORA = LoraSettings(r=4, alpha=8)
CPU = torch.device("cpu")
FP32 = ModelConfig(name="tiny-llama", precision="fp32")


def _base(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters() if "lora_" not in n}


def _moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _plain_and_dp_steps_move_only_the_adapter(lm) -> None:
    blocks = torch.randint(0, 256, (32, 16), generator=torch.Generator().manual_seed(0))
    train = TrainConfig(local_steps=2, batch_size=4)
    before, base = adapter_state(lm.model), _base(lm)
    train_adapter(lm, blocks, train, lr=1e-2, seed=0)
    after_plain = adapter_state(lm.model)
    train_adapter_dp(lm, blocks, train, PrivacyConfig(enabled=True), lr=1e-2,
                     noise_multiplier=1.0, sample_rate=4 / 32)
    after_dp = adapter_state(lm.model)
    assert _moved(before, after_plain) > 0
    assert _moved(after_plain, after_dp) > 0
    assert all(torch.isfinite(v).all() for v in after_dp.values())
    assert all(torch.equal(base[n], p) for n, p in lm.model.named_parameters()
               if "lora_" not in n)


def _travels_like_fp32(lm) -> None:
    """What travels is the fp32 base's adapter layout (names, shapes, fp32)."""
    reference = adapter_state(load_adapted_model(FP32, LORA, seed=0).model)
    state = adapter_state(lm.model)
    assert {k: (v.dtype, v.shape) for k, v in state.items()} == \
        {k: (v.dtype, v.shape) for k, v in reference.items()}
    assert all(p.dtype == torch.float32 for n, p in lm.model.named_parameters()
               if p.requires_grad)


def test_base_dtype_defaults_to_fp32_on_cpu():
    assert resolve_base_dtype(ModelConfig(), CPU) == torch.float32
    assert resolve_base_dtype(ModelConfig(base_dtype="bf16"), CPU) == torch.bfloat16
    assert resolve_base_dtype(ModelConfig(base_dtype="fp16"), CPU) == torch.float16


@pytest.mark.parametrize("base_dtype", ["bf16", "fp16"])
def test_half_precision_base_trains_an_fp32_adapter(base_dtype):
    cfg = ModelConfig(name="tiny-llama", precision="fp32", base_dtype=base_dtype)
    lm = load_adapted_model(cfg, LORA, seed=0)
    dtype = resolve_base_dtype(cfg, CPU)
    assert {p.dtype for n, p in lm.model.named_parameters() if "lora_" not in n} == {dtype}
    _travels_like_fp32(lm)
    _plain_and_dp_steps_move_only_the_adapter(lm)


def test_four_bit_base_trains_plain_and_dp():
    import bitsandbytes as bnb  # the test extra installs it
    lm = load_adapted_model(ModelConfig(name="tiny-llama", quantization="4bit"), LORA, seed=0)
    quantised = [m for m in lm.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # every linear layer of both decoder layers
    assert all(m.weight.quant_type == "nf4" for m in quantised)
    _travels_like_fp32(lm)
    _plain_and_dp_steps_move_only_the_adapter(lm)


def test_four_bit_without_bitsandbytes_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    cfg = ModelConfig(name="tiny-llama", quantization="4bit")
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*fedcpt\[quantization\]"):
        load_base_model(cfg, CPU)


def test_four_bit_config():
    q = quantization_config(ModelConfig(quantization="4bit", precision="fp32"), CPU)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float32  # fp32 asked: no bf16 compute
    assert quantization_config(ModelConfig(), CPU) is None
    with pytest.raises(ConfigError, match="model.base_dtype"):
        load_config("smoke", overrides=["model.quantization=4bit", "model.base_dtype=bf16"])
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config("smoke", overrides=["model.quantization=8bit"])


@pytest.mark.slow  # a shared smoke run (tests/conftest.py:SMOKE_RUNS, one engine start)
@pytest.mark.smoke_run("four-bit")
def test_smoke_simulation_on_a_four_bit_base(smoke_runs):
    """The smoke federation on a 4-bit base: every round aggregates, the domain loss
    falls, and each site uploads the same fp32 adapter bytes as on an fp32 base."""
    cfg, summary = smoke_runs["four-bit"].cfg, smoke_runs["four-bit"].summary
    assert summary["rounds_aggregated"] == cfg.federation.rounds
    assert summary["adaptation"] > 0
    adapter = adapter_state(load_adapted_model(FP32, cfg.lora, seed=0).model)
    assert summary["bytes_up_per_client_round"] == sum(4 * v.numel() for v in adapter.values())
