"""Unit-level DP-SGD on the LoRA parameters: the adapter learns, the base does not, nothing
leaks between rounds, each unit is drawn at most once per step, an empty Poisson batch
still releases noise, and logical batches split into physical ones are noised once."""

import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedcpt.config import PrivacyConfig, TrainConfig
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.privacy.dpsgd import OneBlockPerUnit, UnitPoissonSampler, train_adapter_dp
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


def test_ledger_rate_is_the_rate_the_unit_sampler_uses(fresh_lm, text_blocks):
    q = sample_rate(len(text_blocks), TRAIN.batch_size)
    assert q == pytest.approx(1 / 4)  # 16 blocks, each its own unit, batch 4
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=0.5,
                     sample_rate=q)
    with pytest.raises(RuntimeError, match="unit sampler samples at"):
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


# --- the unit sampler ---------------------------------------------------------------------

def _unit_batches(owners, q, steps):
    sampling = torch.Generator().manual_seed(0)
    blocks = torch.arange(len(owners)).unsqueeze(1)  # block i holds token i
    data = OneBlockPerUnit(blocks, owners, sampling)
    for units in UnitPoissonSampler(int(owners.max()) + 1, q, steps, sampling):
        yield [int(owners[int(data[u][0])]) for u in units]


def test_a_unit_with_fifty_blocks_is_drawn_at_most_once_per_step():
    owners = torch.cat([torch.zeros(50, dtype=torch.long), torch.arange(1, 21)])
    batches = list(_unit_batches(owners, q=0.5, steps=400))
    assert all(len(b) == len(set(b)) for b in batches)  # no unit twice in one step
    share = sum(0 in b for b in batches) / len(batches)
    assert share == pytest.approx(0.5, abs=0.08)  # sampled at q, like any other unit
    sizes = [len(b) for b in batches]
    assert sum(sizes) / len(sizes) == pytest.approx(0.5 * 21, rel=0.1)  # q · units


def test_each_sampled_unit_gives_one_of_its_own_blocks():
    owners = torch.tensor([0, 0, 0, 1, 1, 2])
    seen = {0: set(), 1: set(), 2: set()}
    data = OneBlockPerUnit(torch.arange(6).unsqueeze(1), owners, torch.Generator().manual_seed(1))
    for _ in range(200):
        for unit in range(3):
            seen[unit].add(int(data[unit][0]))
    assert seen == {0: {0, 1, 2}, 1: {3, 4}, 2: {5}}


def test_an_empty_poisson_batch_takes_a_noise_only_step(fresh_lm, text_blocks, monkeypatch):
    noised = []
    real_noise = DPOptimizer.add_noise
    monkeypatch.setattr(DPOptimizer, "add_noise",
                        lambda self: (noised.append(1), real_noise(self))[1])
    monkeypatch.setattr(UnitPoissonSampler, "__iter__",
                        lambda self: iter([[] for _ in range(self.steps)]))
    before = adapter_state(fresh_lm.model)
    result = train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2,
                              noise_multiplier=1.0)
    after = adapter_state(fresh_lm.model)
    assert len(noised) == TRAIN.local_steps  # every empty step released noise
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert result.steps == TRAIN.local_steps


def test_logical_batches_split_into_physical_ones_are_noised_once(fresh_lm, text_blocks,
                                                                  monkeypatch):
    noised, physical = [], []
    real_noise = DPOptimizer.add_noise
    monkeypatch.setattr(DPOptimizer, "add_noise",
                        lambda self: (noised.append(1), real_noise(self))[1])
    # The decoder sees every physical batch (the chunked loss calls it directly).
    decoder = fresh_lm.model.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda _m, _a, kw: physical.append(kw["input_ids"].shape[0]), with_kwargs=True)
    train = TrainConfig(local_steps=3, batch_size=12, max_physical_batch_size=2)  # q = 12/16
    try:
        train_adapter_dp(fresh_lm, text_blocks, train, PrivacyConfig(enabled=True), lr=1e-2,
                         noise_multiplier=0.5)
    finally:
        hook.remove()
    assert len(noised) == train.local_steps
    assert max(physical) <= 2 and len(physical) > train.local_steps


def test_ffa_lora_trains_only_b(fresh_lm, text_blocks):
    before = adapter_state(fresh_lm.model)
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PrivacyConfig(enabled=True, ffa_lora=True),
                     lr=1e-2, noise_multiplier=0.5)
    after = adapter_state(fresh_lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_A" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    # A trains again outside DP-SGD: the cached model is restored
    assert all(p.requires_grad for n, p in fresh_lm.model.named_parameters() if "lora_A" in n)


def test_dp_sgd_noise_is_opacus_secure_mode_noise(fresh_lm, text_blocks, monkeypatch):
    """Every noise draw of a DP-SGD step goes through Opacus's floating-point-robust
    secure_mode path (issue 25, item 4), with the CSPRNG-seeded generator."""
    import opacus.optimizers.optimizer as opacus_optimizer

    calls = []
    real = opacus_optimizer._generate_noise

    def spy(std, reference, generator=None, secure_mode=False):
        calls.append((secure_mode, generator is not None))
        return real(std, reference, generator=generator, secure_mode=secure_mode)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", spy)
    train_adapter_dp(fresh_lm, text_blocks, TRAIN, PRIVACY, lr=1e-2, noise_multiplier=0.5)
    assert calls and all(calls_ == (True, True) for calls_ in calls)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_noise_dominated_step_moves_each_coordinate_by_about_the_lr(fresh_lm, text_blocks,
                                                                      optimizer):
    """One step with noise far above the clipped gradients: AdamW's first step is a sign
    step (every coordinate of B moves by exactly lr); `sgd` divides by the noise's std, so
    the coordinates move by lr × a standard normal (root mean square ≈ lr, not all equal)."""
    train = TrainConfig(local_steps=1, batch_size=8, max_grad_norm=0.0)
    before = adapter_state(fresh_lm.model)
    train_adapter_dp(fresh_lm, text_blocks, train,
                     PrivacyConfig(enabled=True, ffa_lora=True, optimizer=optimizer),
                     lr=1e-2, noise_multiplier=1000.0)
    after = adapter_state(fresh_lm.model)
    moved = torch.cat([(after[k] - before[k]).flatten() for k in before if "lora_B" in k])
    rms = moved.pow(2).mean().sqrt().item()
    if optimizer == "adamw":
        torch.testing.assert_close(moved.abs(), torch.full_like(moved, 1e-2), rtol=1e-3,
                                   atol=0)
    else:
        assert 0.9e-2 < rms < 1.1e-2
        assert moved.abs().std() > 0.3e-2


def test_sgd_needs_no_weight_decay():
    from fedcpt.config import load_config
    from fedcpt.exceptions import ConfigError

    with pytest.raises(ConfigError, match="train.weight_decay"):
        load_config("smoke", overrides=["privacy.enabled=true", "privacy.optimizer=sgd",
                                        "train.weight_decay=0.01"])
    load_config("smoke", overrides=["privacy.enabled=true", "privacy.optimizer=sgd"])
