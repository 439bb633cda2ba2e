"""EWC: the server's diagonal Fisher, its transport with training instructions, and the
Fisher-weighted anchor at the sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcpt.config import TrainConfig, load_config
from fedcpt.core.adapters import adapter_state, to_arrays
from fedcpt.core.fisher import diagonal_fisher
from fedcpt.core.training import Anchor, adapter_param, train_adapter
from fedcpt.exceptions import ConfigError
from fedcpt.server.fisher import FisherForSites


@pytest.fixture
def trained_lm(fresh_lm, text_blocks):
    """The tiny model with an adapter trained away from B = 0 (so A matters too)."""
    train_adapter(fresh_lm, text_blocks, TrainConfig(local_steps=5, batch_size=4), lr=5e-2,
                  seed=0)
    return fresh_lm


def test_diagonal_fisher_is_the_mean_squared_per_block_gradient_scaled_to_one(
        trained_lm, text_blocks):
    blocks = text_blocks[:3]
    fisher = diagonal_fisher(trained_lm, blocks)
    assert set(fisher) == set(adapter_state(trained_lm.model))
    assert max(float(t.max()) for t in fisher.values()) == pytest.approx(1.0)
    assert all(float(t.min()) >= 0 for t in fisher.values())
    # by hand: Σ_blocks grad² for every tensor, then divided by the global maximum
    named = dict(trained_lm.model.named_parameters())
    totals = {k: torch.zeros_like(named[adapter_param(named, k)]) for k in fisher}
    for block in blocks:
        trained_lm.model.zero_grad()
        trained_lm.model(input_ids=block[None], labels=block[None]).loss.backward()
        for k in totals:
            totals[k] += named[adapter_param(named, k)].grad ** 2
    peak = max(float(t.max()) for t in totals.values())
    for k, t in totals.items():
        np.testing.assert_allclose(fisher[k].numpy(), (t / peak).numpy(), rtol=1e-4,
                                   atol=1e-7)
    lora_a = [k for k in fisher if "lora_A" in k]
    assert any(float(fisher[k].max()) > 0 for k in lora_a)  # A matters once B ≠ 0


def test_weighted_anchor_pulls_each_coordinate_by_its_weight(trained_lm):
    state = adapter_state(trained_lm.model)
    key = next(iter(state))
    targets = {key: torch.zeros_like(state[key])}
    weights = {key: torch.rand_like(state[key])}
    named = dict(trained_lm.model.named_parameters())
    param = named[adapter_param(named, key)]
    before = param.detach().clone()
    Anchor(trained_lm.model, targets, weight=10.0, weights=weights).pull(lr=0.01)
    expected = before - 0.01 * 10.0 * weights[key] * before
    torch.testing.assert_close(param.detach(), expected)


def test_the_fisher_sent_to_sites_is_the_global_adapters_on_the_general_blocks(
        trained_lm, text_blocks):
    # the round loop attaches it to every training request, retries included
    # (tests/server/test_round_loop.py), and never to evaluation requests
    arrays = to_arrays(adapter_state(trained_lm.model))
    fisher = FisherForSites(trained_lm, text_blocks[:2])(1, arrays)
    assert set(fisher.keys()) == set(arrays.keys())
    expected = diagonal_fisher(trained_lm, text_blocks[:2])
    for key, value in expected.items():
        np.testing.assert_allclose(fisher[key].numpy(), value.numpy())


def test_ewc_config_errors():
    with pytest.raises(ConfigError, match="ewc"):
        load_config("smoke", overrides=["strategy.anchor=ewc", "privacy.user_level=true"])
    with pytest.raises(ConfigError, match="strategy.fisher_blocks"):
        load_config("smoke", overrides=["strategy.anchor=ewc", "strategy.fisher_blocks=0"])


def test_ewc_without_a_rehearsal_pool_is_a_config_error(write_text):
    from fedcpt.server.app import general_data

    general = write_text("general.txt", n_chars=40_000)
    # every general training block goes to validation: nothing left to compute a Fisher on
    overrides = [f"data.general={general}", "strategy.rehearsal_val_blocks=100000"]
    assert general_data(load_config("smoke", overrides=overrides)).evaluation.numel()
    with pytest.raises(ConfigError, match="rehearsal pool"):
        general_data(load_config("smoke", overrides=[*overrides, "strategy.anchor=ewc"]))


@pytest.mark.slow  # a shared smoke run (tests/conftest.py:SMOKE_RUNS, one engine start)
@pytest.mark.smoke_run("ewc")
def test_smoke_run_with_ewc_finishes(smoke_runs):
    run = smoke_runs["ewc"]
    assert run.cfg.strategy.anchor == "ewc" and run.cfg.strategy.anchor_weight == 50
    summary = run.summary
    assert summary["rounds_aggregated"] == 2 and summary["failures"] == 0
