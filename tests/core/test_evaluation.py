"""Held-out metrics: loss, perplexity, calibration and the paired standard error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedcpt.core.evaluation import evaluate_blocks, paired_standard_error


def _manual_losses(model, blocks: torch.Tensor) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1].float()
    targets = blocks[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view(targets.shape)
    return nll.mean(dim=1).tolist()


def test_loss_matches_manual_cross_entropy(fresh_lm, text_blocks):
    blocks = text_blocks[:5]
    result = evaluate_blocks(fresh_lm, blocks, batch_size=2)  # uneven last batch
    fresh_lm.model.eval()
    manual = _manual_losses(fresh_lm.model, blocks)
    assert result.block_losses == pytest.approx(manual, abs=1e-4)
    assert result.loss == pytest.approx(sum(manual) / len(manual), abs=1e-4)
    assert result.tokens == 5 * (blocks.shape[1] - 1)


def test_loss_does_not_depend_on_batch_size(fresh_lm, text_blocks):
    a = evaluate_blocks(fresh_lm, text_blocks[:6], batch_size=1)
    b = evaluate_blocks(fresh_lm, text_blocks[:6], batch_size=6)
    assert a.loss == pytest.approx(b.loss, abs=1e-5)
    assert a.ece == pytest.approx(b.ece, abs=1e-5)


def test_perplexity_and_ece(fresh_lm, text_blocks):
    result = evaluate_blocks(fresh_lm, text_blocks[:4], batch_size=4)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert 0.0 <= result.ece <= 1.0
    # a random-weight model over 257 tokens is close to uniform: loss near log(257)
    assert 4.0 < result.loss < 7.0


def test_evaluation_restores_training_mode(fresh_lm, text_blocks):
    fresh_lm.model.train()
    evaluate_blocks(fresh_lm, text_blocks[:2], batch_size=2)
    assert fresh_lm.model.training
    fresh_lm.model.eval()
    evaluate_blocks(fresh_lm, text_blocks[:2], batch_size=2)
    assert not fresh_lm.model.training


def test_evaluation_leaves_weights_and_grads_alone(fresh_lm, text_blocks):
    before = {n: p.detach().clone() for n, p in fresh_lm.model.named_parameters()}
    evaluate_blocks(fresh_lm, text_blocks[:2], batch_size=2)
    for name, param in fresh_lm.model.named_parameters():
        assert torch.equal(param, before[name])
        assert param.grad is None


def test_paired_standard_error_constant_shift_is_zero():
    assert paired_standard_error([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) == pytest.approx(0.0)


def test_paired_standard_error_arithmetic():
    # differences 1, 2, 3, 4: mean 2.5, sample variance 5/3, SE = sqrt(5/3 / 4)
    se = paired_standard_error([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0])
    assert se == pytest.approx(math.sqrt(5 / 12))
    # symmetric in sign of the change
    assert paired_standard_error([1.0, 2.0, 3.0, 4.0], [0.0] * 4) == pytest.approx(se)


def test_paired_standard_error_needs_two_pairs():
    assert math.isnan(paired_standard_error([1.0], [2.0]))
    assert math.isnan(paired_standard_error([], []))


def test_paired_standard_error_rejects_unpaired_lists():
    with pytest.raises(ValueError):
        paired_standard_error([1.0, 2.0], [1.0, 2.0, 3.0])
