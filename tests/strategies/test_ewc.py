"""EWC: the server's diagonal Fisher, its transport with training instructions, and the
Fisher-weighted anchor at the sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedcpt.config import TrainConfig, load_config
from fedcpt.core.adapters import adapter_state, to_arrays
from fedcpt.core.fisher import diagonal_fisher
from fedcpt.core.training import Anchor, adapter_param, train_adapter
from fedcpt.exceptions import ConfigError
from fedcpt.strategies.ewc import FisherToSites
from fedcpt.strategies.fedavg import AdapterFedAvg


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


@pytest.fixture
def server_identity(monkeypatch):
    """Messages are created inside a running ServerApp; act as one (SuperLink node 0)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def test_train_instructions_carry_the_fisher_and_evaluation_does_not(
        server_identity, trained_lm, text_blocks):

    class Grid:
        def get_node_ids(self):
            return [11, 12]

    inner = AdapterFedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    strategy = FisherToSites(inner, trained_lm, text_blocks[:2])
    arrays = to_arrays(adapter_state(trained_lm.model))
    train = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid()))
    assert len(train) == 2
    for msg in train:
        fisher = msg.content.array_records["fisher"]
        assert set(fisher.keys()) == set(arrays.keys())
    evaluate = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), Grid()))
    assert all("fisher" not in m.content.array_records for m in evaluate)


def test_resends_through_the_strategy_grid_carry_the_fisher_too(server_identity):
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedcpt.strategies.ewc import FisherGrid

    sent: list[Message] = []

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            sent.extend(messages)
            return []

    fisher = ArrayRecord({"w": Array(np.ones(2, np.float32))})
    view = FisherGrid(Grid(), fisher)
    train = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))})}),
                    dst_node_id=5, message_type="train")
    keys = Message(RecordDict({"config": ConfigRecord({"stage": 1})}), dst_node_id=5,
                   message_type="train.secagg_setup")
    view.send_and_receive([train, keys], timeout=1.0)  # e.g. a round retry
    assert sent[0].content.array_records["fisher"] is fisher
    assert "fisher" not in sent[1].content.array_records


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


def test_smoke_run_with_ewc_finishes(tmp_path, sites_config):
    from fedcpt.simulations.runner import simulate

    cfg = load_config("smoke", config_file=sites_config,
                      overrides=["strategy.anchor=ewc", "strategy.anchor_weight=50"])
    summary = simulate(cfg, tmp_path / "run")
    assert summary["rounds_aggregated"] == 2 and summary["failures"] == 0
