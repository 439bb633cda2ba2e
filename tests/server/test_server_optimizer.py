"""Server optimisers (FedAvgM, FedAdam, FedYogi) against hand-computed steps, their
state across a save/load, and a smoke simulation with each."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedcpt.config import StrategyConfig, load_config
from fedcpt.exceptions import ConfigError
from fedcpt.server.steps.server_optimizer import STATE_FILE, ServerOptimizer

KEYS = ("a", "b")


def _rec(values: dict[str, list[float]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in values.items()})


def _np(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arrays[k].numpy().astype(np.float64) for k in arrays.keys()}


X0 = {"a": [0.5, -1.0, 2.0], "b": [0.1, 0.0]}
AGG1 = {"a": [0.7, -1.5, 2.0], "b": [0.0, 0.3]}
SHIFT2 = {"a": [0.1, 0.4, -0.2], "b": [-0.3, 0.05]}  # round 2's aggregate = x1 + shift


def _two_rounds(opt: ServerOptimizer) -> tuple[dict, dict]:
    """Apply two rounds; returns (x1, x2) as float64 arrays."""
    x1 = opt.apply(1, _rec(X0), _rec(AGG1), client_examples=8).arrays
    agg2 = {k: (x1[k].numpy() + np.asarray(SHIFT2[k], np.float32)).tolist() for k in KEYS}
    x2 = opt.apply(2, x1, _rec(agg2), client_examples=8).arrays
    return _np(x1), _np(x2)


def _grads() -> list[dict[str, np.ndarray]]:
    """Δ₁ = x₀ − agg₁ and Δ₂ = x₁ − agg₂ = −shift."""
    g1 = {k: np.asarray(X0[k]) - np.asarray(AGG1[k]) for k in KEYS}
    g2 = {k: -np.asarray(SHIFT2[k]) for k in KEYS}
    return [g1, g2]


def _check(x1: dict, x2: dict, expected_x1: dict, expected_x2: dict) -> None:
    for k in KEYS:
        np.testing.assert_allclose(x1[k], expected_x1[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x2[k], expected_x2[k], rtol=1e-5, atol=1e-6)


def _cfg(**kwargs) -> StrategyConfig:
    return StrategyConfig(**kwargs)


def test_fedavgm_is_heavy_ball_momentum_on_the_pseudo_gradient():
    lr, beta = 0.7, 0.9
    x1, x2 = _two_rounds(ServerOptimizer(_cfg(server_optimizer="fedavgm", server_lr=lr,
                                              server_momentum=beta)))
    g1, g2 = _grads()
    e1, e2 = {}, {}
    for k in KEYS:
        m1 = g1[k]
        e1[k] = np.asarray(X0[k]) - lr * m1
        m2 = beta * m1 + g2[k]
        e2[k] = e1[k] - lr * m2
    _check(x1, x2, e1, e2)


def test_fedavgm_without_momentum_at_lr_one_is_fedavg():
    opt = ServerOptimizer(_cfg(server_optimizer="fedavgm", server_lr=1.0, server_momentum=0))
    x1 = opt.apply(1, _rec(X0), _rec(AGG1), client_examples=8).arrays
    for k in KEYS:
        np.testing.assert_allclose(x1[k].numpy(), AGG1[k], rtol=1e-6)


def test_fedadam_is_bias_corrected_adam_with_tau_as_epsilon():
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    x1, x2 = _two_rounds(ServerOptimizer(_cfg(server_optimizer="fedadam", server_lr=lr,
                                              beta_1=b1, beta_2=b2, tau=tau)))
    g1, g2 = _grads()
    e1, e2 = {}, {}
    for k in KEYS:
        m, v, x = np.zeros(len(X0[k])), np.zeros(len(X0[k])), np.asarray(X0[k], float)
        for t, g in ((1, g1[k]), (2, g2[k])):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + tau)
            (e1 if t == 1 else e2)[k] = x
    _check(x1, x2, e1, e2)


def test_fedyogi_uses_the_sign_controlled_second_moment():
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    x1, x2 = _two_rounds(ServerOptimizer(_cfg(server_optimizer="fedyogi", server_lr=lr,
                                              beta_1=b1, beta_2=b2, tau=tau)))
    g1, g2 = _grads()
    e1, e2 = {}, {}
    for k in KEYS:
        m, v, x = np.zeros(len(X0[k])), np.zeros(len(X0[k])), np.asarray(X0[k], float)
        for t, g in ((1, g1[k]), (2, g2[k])):
            m = b1 * m + (1 - b1) * g
            v = v - (1 - b2) * g * g * np.sign(v - g * g)
            x = x - lr * m / (np.sqrt(v) + tau)
            (e1 if t == 1 else e2)[k] = x
    _check(x1, x2, e1, e2)
    # Yogi differs from Adam on the second step (v moves additively, not by EMA)
    adam = _two_rounds(ServerOptimizer(_cfg(server_optimizer="fedadam", server_lr=lr)))[1]
    assert not np.allclose(adam["a"], x2["a"])


def test_default_server_lr_depends_on_the_optimiser():
    assert ServerOptimizer(_cfg(server_optimizer="fedavgm")).lr == 1.0
    assert ServerOptimizer(_cfg(server_optimizer="fedadam")).lr == 0.01
    assert ServerOptimizer(_cfg(server_optimizer="fedyogi", server_lr=0.3)).lr == 0.3


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_state_survives_save_and_load(tmp_path, kind):
    cfg = _cfg(server_optimizer=kind, server_lr=0.1)
    original = ServerOptimizer(cfg)
    x1 = original.apply(1, _rec(X0), _rec(AGG1), client_examples=8).arrays
    original.save_state(tmp_path)
    assert (tmp_path / STATE_FILE).is_file()
    restored = ServerOptimizer(cfg)
    restored.load_state(tmp_path)
    agg2 = _rec({k: (x1[k].numpy() + np.asarray(SHIFT2[k], np.float32)).tolist()
                 for k in KEYS})
    want = original.apply(2, x1, agg2, client_examples=8).arrays
    got = restored.apply(2, x1, agg2, client_examples=8).arrays
    for k in KEYS:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())
    # a fresh optimiser (no moments) takes a different second step
    fresh = ServerOptimizer(cfg).apply(2, x1, agg2, client_examples=8).arrays
    assert not np.allclose(fresh["a"].numpy(), want["a"].numpy())


def test_loading_another_optimisers_state_is_a_config_error(tmp_path):
    adam = ServerOptimizer(_cfg(server_optimizer="fedadam"))
    adam.apply(1, _rec(X0), _rec(AGG1), client_examples=8)
    adam.save_state(tmp_path)
    with pytest.raises(ConfigError, match="fedadam"):
        ServerOptimizer(_cfg(server_optimizer="fedyogi")).load_state(tmp_path)
    with pytest.raises(ConfigError, match="no server-optimizer"):
        ServerOptimizer(_cfg(server_optimizer="fedadam")).load_state(tmp_path / "missing")


def test_a_rejected_round_does_not_enter_the_moments():
    cfg = _cfg(server_optimizer="fedavgm", server_lr=0.5, server_momentum=0.9)
    opt = ServerOptimizer(cfg)
    opt.apply(1, _rec(X0), _rec(AGG1), client_examples=8)  # then rejected: x0 stays global
    agg2 = _rec({k: (np.asarray(X0[k]) + np.asarray(SHIFT2[k])).tolist() for k in KEYS})
    after_reject = opt.apply(2, _rec(X0), agg2, client_examples=8).arrays
    clean = ServerOptimizer(cfg).apply(2, _rec(X0), agg2, client_examples=8).arrays
    for k in KEYS:
        np.testing.assert_allclose(after_reject[k].numpy(), clean[k].numpy(), rtol=1e-6)


@pytest.mark.parametrize(("key", "value"), [
    ("server_optimizer", "fedsgd"), ("server_lr", -1.0), ("server_momentum", 1.0),
    ("beta_1", 1.0), ("beta_2", -0.1), ("tau", 0.0)])
def test_bad_optimiser_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"strategy.{key}"):
        load_config("smoke", overrides=[f"strategy.{key}={value}"])


def test_server_optimiser_with_user_level_dp_is_rejected():
    with pytest.raises(ConfigError, match="server_optimizer"):
        load_config("smoke", overrides=["strategy.server_optimizer=fedadam",
                                        "privacy.user_level=true"])


@pytest.mark.slow  # shared smoke runs (tests/conftest.py:SMOKE_RUNS, one engine start)
@pytest.mark.smoke_run("fedavgm", "fedadam", "fedyogi")
@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_smoke_run_with_each_optimiser_finishes(smoke_runs, kind):
    run = smoke_runs[kind]  # smoke: 2 rounds, server_lr 0.02
    assert run.cfg.federation.rounds == 2 and run.cfg.strategy.server_optimizer == kind
    assert run.summary["rounds_aggregated"] == 2
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text()
            .splitlines()]
    steps = [r["server_steps"]["server_optimizer"] for r in rows[1:]]
    assert [s["optimizer"] for s in steps] == [kind, kind]
    assert all(s["step_norm"] > 0 for s in steps)
    restored = ServerOptimizer(run.cfg.strategy)
    restored.load_state(run.run_dir / "adapters" / "round-002")
    assert restored.committed and restored.pending is not None
