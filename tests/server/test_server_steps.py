"""Server steps on the aggregate: rehearsal (mix, finetune) and delta scaling."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedcpt.config import TrainConfig
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays, weighted_sum
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.server.steps.delta_scaling import DeltaScaling, interpolate
from fedcpt.server.steps.regression_guard import RegressionGuard
from fedcpt.server.steps.rehearsal import Rehearsal


def _record(value: float) -> ArrayRecord:
    return ArrayRecord({"a": Array(np.full((2, 3), value, np.float32)),
                        "b": Array(np.full((4,), 2 * value, np.float32))})


def test_weighted_sum_and_interpolation_arithmetic():
    mixed = weighted_sum([(_record(1.0), 0.75), (_record(5.0), 0.25)])
    np.testing.assert_allclose(mixed["a"].numpy(), 2.0)
    np.testing.assert_allclose(mixed["b"].numpy(), 4.0)
    assert mixed["a"].numpy().dtype == np.float32
    halfway = interpolate(_record(0.0), _record(4.0), alpha=0.25)
    np.testing.assert_allclose(halfway["a"].numpy(), 1.0)


@pytest.fixture
def trained(fresh_lm, text_blocks):
    """(initial adapter, an adapter trained away from it on the domain blocks)."""
    from fedcpt.core.training import train_adapter

    initial = to_arrays(adapter_state(fresh_lm.model))
    train_adapter(fresh_lm, text_blocks, TrainConfig(local_steps=15, batch_size=4), lr=5e-2,
                  seed=0)
    return initial, to_arrays(adapter_state(fresh_lm.model))


def _general_blocks(byte_tok):
    from fedcpt.core.data import pack

    text = ["def add(a, b):\n    return a + b\n" * 40]
    ids = byte_tok(text, add_special_tokens=False)["input_ids"]
    return pack(ids, byte_tok.eos_token_id, 64)


@pytest.mark.parametrize("mode", ["mix", "finetune"])
def test_rehearsal_lowers_general_loss_of_the_aggregate(fresh_lm, trained, byte_tok, mode):
    initial, aggregate = trained
    general = _general_blocks(byte_tok)
    load_adapter(fresh_lm.model, aggregate)
    before = evaluate_blocks(fresh_lm, general, 8).loss
    train = TrainConfig(local_steps=10, batch_size=4, lr=5e-2)
    step = Rehearsal(fresh_lm, general, train, mode=mode, replay_fraction=0.5,
                     lr_at=lambda r: train.lr_at(r, 1), seed=0)
    step_result = step.apply(1, initial, aggregate, client_examples=80)
    result, detail = step_result.arrays, step_result.details
    assert detail["mode"] == mode
    load_adapter(fresh_lm.model, result)
    assert evaluate_blocks(fresh_lm, general, 8).loss < before


def test_delta_scaling_takes_the_largest_alpha_within_tolerance(fresh_lm, trained, byte_tok):
    initial, aggregate = trained
    validation = _general_blocks(byte_tok)
    loose = DeltaScaling(fresh_lm, validation, alphas=(0.25, 0.5, 1.0), tolerance=10.0,
                         batch_size=8)
    step_result = loose.apply(1, initial, aggregate, client_examples=0)
    result, detail = step_result.arrays, step_result.details
    assert detail["alpha"] == 1.0
    np.testing.assert_allclose(result["base_model.model.model.layers.0.self_attn.q_proj"
                                      ".lora_B.weight"].numpy(),
                               aggregate["base_model.model.model.layers.0.self_attn.q_proj"
                                         ".lora_B.weight"].numpy(), rtol=1e-6)
    strict = DeltaScaling(fresh_lm, validation, alphas=(0.25, 0.5, 1.0), tolerance=-1.0,
                          batch_size=8)  # nothing passes: the smallest α is kept
    step_result = strict.apply(1, initial, aggregate, client_examples=0)
    result, detail = step_result.arrays, step_result.details
    assert detail["alpha"] == 0.25
    expected = interpolate(initial, aggregate, 0.25)
    for key in result.keys():
        np.testing.assert_allclose(result[key].numpy(), expected[key].numpy(), rtol=1e-6)


def test_regression_guard_keeps_the_accepted_adapter_when_general_loss_jumps(
        fresh_lm, trained, byte_tok):
    initial, aggregate = trained
    validation = _general_blocks(byte_tok)
    lenient = RegressionGuard(fresh_lm, validation, threshold=100.0, batch_size=8)
    step_result = lenient.apply(1, initial, aggregate, client_examples=0)
    accepted, detail = step_result.arrays, step_result.details
    assert not detail["rejected"] and accepted is aggregate and not step_result.rejects_round
    # a limit just below the measured rise rejects the round and keeps the accepted adapter
    strict = RegressionGuard(fresh_lm, validation, threshold=detail["rise"] - 1e-3,
                             batch_size=8)
    step_result = strict.apply(1, initial, aggregate, client_examples=0)
    kept, detail = step_result.arrays, step_result.details
    assert detail["rejected"] and kept is initial and step_result.rejects_round
