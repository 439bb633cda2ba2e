"""DP-SGD on the LoRA parameters: the adapter learns, the base does not, nothing leaks
between rounds, and the ledger's sampling rate is the one Opacus uses."""

import pytest
import torch

from fedcpt.config import PrivacyConfig, TrainConfig
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.privacy.dpsgd import train_adapter_dp
from fedcpt.privacy.plan import sample_rate

TRAIN = TrainConfig(local_steps=6, batch_size=4)
PRIVACY = PrivacyConfig(enabled=True)


def test_adapter_moves_and_base_stays(fresh_lm, text_blocks):
    # opacus#820: LoRA weights can silently stay put under Opacus; ours must move
    before = adapter_state(fresh_lm.model)
    base = {n: p.detach().clone() for n, p in fresh_lm.model.named_parameters()
            if "lora_" not in n}
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=0.5)
    after = adapter_state(fresh_lm.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, base[n]) for n, p in fresh_lm.model.named_parameters()
               if "lora_" not in n)


def test_no_opacus_state_left_on_the_cached_model(fresh_lm, text_blocks):
    for _ in range(2):  # a second round on the same model must work the same way
        train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=0.5)
    modules = list(fresh_lm.model.modules())
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in modules) == 0
    assert not any(hasattr(p, "grad_sample") for p in fresh_lm.model.parameters())


def test_reported_examples_are_the_logical_batch_not_the_sampled_one(fresh_lm, text_blocks):
    result = train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2,
                              noise_multiplier=0.5)
    assert result.examples == TRAIN.local_steps * TRAIN.batch_size


def test_ledger_rate_is_the_rate_opacus_samples_at(fresh_lm, text_blocks):
    q = sample_rate(len(text_blocks), TRAIN.batch_size)
    assert q == pytest.approx(1 / 4)  # 16 blocks, batch 4
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=0.5,
                     sample_rate=q)
    with pytest.raises(RuntimeError, match="Opacus samples at"):
        train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2,
                         noise_multiplier=0.5, sample_rate=0.3)


def test_two_runs_draw_different_noise(fresh_lm, text_blocks):
    # noise from a public seed could be subtracted: runs must not repeat it
    start = adapter_state(fresh_lm.model)
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=1.0)
    first = adapter_state(fresh_lm.model)
    load_adapter(fresh_lm.model, to_arrays(start))
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=1.0)
    second = adapter_state(fresh_lm.model)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_anchor_pull_is_applied_under_dp(fresh_lm, text_blocks):
    # L2-SP toward the initial adapter: with a strong pull the adapter stays near it
    from fedcpt.core.adapters import from_arrays
    from fedcpt.core.training import Anchor

    start = adapter_state(fresh_lm.model)
    anchor = Anchor(fresh_lm.model, from_arrays(to_arrays(start)), weight=90.0)
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=0.5,
                     anchor=anchor)
    pulled = adapter_state(fresh_lm.model)
    load_adapter(fresh_lm.model, to_arrays(start))
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=0.5)
    free = adapter_state(fresh_lm.model)

    def drift(state):
        return sum(float((state[k] - start[k]).norm()) for k in start)

    assert drift(pulled) < 0.5 * drift(free)
