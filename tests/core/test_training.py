"""Local LoRA training at one site: what changes, what must not, and reproducibility."""

from __future__ import annotations

import math

import torch

from fedcpt.config import LoraSettings, TrainConfig
from fedcpt.core.adapters import adapter_state
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, attach_lora, tiny_llama
from fedcpt.core.training import train_adapter


def _new_lm(byte_tok) -> AdaptedModel:
    model = attach_lora(tiny_llama(len(byte_tok)), LoraSettings(r=4, alpha=8), seed=0)
    return AdaptedModel(model, byte_tok, torch.device("cpu"), None)


def test_training_changes_lora_and_only_lora(fresh_lm, text_blocks):
    model = fresh_lm.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()
                   if "lora_" not in n}
    lora_before = adapter_state(model)
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_before.items() if "lora_B" in k)

    result = train_adapter(fresh_lm, text_blocks, TrainConfig(local_steps=3, batch_size=4),
                           lr=1e-2, seed=0)

    lora_after = adapter_state(model)
    b_keys = [k for k in lora_after if "lora_B" in k]
    assert b_keys
    for key in b_keys:
        assert torch.count_nonzero(lora_after[key]) > 0, f"{key} is still zero"
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), f"base weight {name} changed"
    assert result.steps == 3
    assert result.examples == 3 * 4
    assert result.tokens == 3 * 4 * text_blocks.shape[1]
    assert result.seconds >= 0
    assert math.isfinite(result.mean_loss)


def test_training_lowers_loss_on_repeated_data(fresh_lm, text_blocks):
    blocks = text_blocks[:4]
    before = evaluate_blocks(fresh_lm, blocks, batch_size=4).loss
    result = train_adapter(fresh_lm, blocks, TrainConfig(local_steps=20, batch_size=4),
                           lr=1e-2, seed=0)
    after = evaluate_blocks(fresh_lm, blocks, batch_size=4).loss
    assert after < before - 0.1, (before, after)  # ~0.25 nats on this model
    assert result.mean_loss < before


def test_same_seed_gives_identical_adapter(byte_tok, text_blocks):
    train = TrainConfig(local_steps=5, batch_size=4)
    a, b, c = _new_lm(byte_tok), _new_lm(byte_tok), _new_lm(byte_tok)
    ra = train_adapter(a, text_blocks, train, lr=1e-2, seed=42)
    rb = train_adapter(b, text_blocks, train, lr=1e-2, seed=42)
    train_adapter(c, text_blocks, train, lr=1e-2, seed=43)
    sa, sb, sc = adapter_state(a.model), adapter_state(b.model), adapter_state(c.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra.mean_loss == rb.mean_loss
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # another seed, other batches


def test_physical_batches_give_the_whole_batchs_step_in_its_memory(byte_tok, text_blocks):
    whole, split = _new_lm(byte_tok), _new_lm(byte_tok)
    seen: list[int] = []
    decoder = split.model.get_base_model().get_decoder()
    decoder.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    r_whole = train_adapter(whole, text_blocks, TrainConfig(local_steps=3, batch_size=6),
                            lr=1e-2, seed=42)
    r_split = train_adapter(split, text_blocks,
                            TrainConfig(local_steps=3, batch_size=6, max_physical_batch_size=4),
                            lr=1e-2, seed=42)
    assert seen == [4, 2] * 3  # never more than 4 blocks through the model at once
    sw, ss = adapter_state(whole.model), adapter_state(split.model)
    assert all(torch.allclose(sw[k], ss[k], atol=1e-5) for k in sw)  # fp32 round-off
    assert math.isclose(r_whole.mean_loss, r_split.mean_loss, rel_tol=1e-5)
    assert r_split.examples == r_whole.examples == 18


def test_zero_lr_changes_nothing(fresh_lm, text_blocks):
    before = adapter_state(fresh_lm.model)
    train_adapter(fresh_lm, text_blocks, TrainConfig(local_steps=2, batch_size=2), lr=0.0,
                  seed=0)
    after = adapter_state(fresh_lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_leaves_no_gradients_behind(fresh_lm, text_blocks):
    train_adapter(fresh_lm, text_blocks, TrainConfig(local_steps=2, batch_size=2), lr=1e-2,
                  seed=0)
    assert all(p.grad is None for p in fresh_lm.model.parameters())
    assert not fresh_lm.model.training
