"""Held-out metrics: loss, perplexity, calibration (against known answers), KL to the
base model, per-kind evaluation and the paired standard error."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fedcpt.core.evaluation import (
    BaseLogprobs,
    adapter_is_identity,
    evaluate_blocks,
    evaluate_kinds,
    expected_calibration_error,
    kl_divergence,
    paired_standard_error,
)
from fedcpt.core.model import AdaptedModel


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


# --- calibration against known answers -------------------------------------------------

def test_ece_of_a_perfectly_calibrated_predictor_is_zero():
    # in each bin, exactly the stated share of predictions is right
    conf, correct = [], []
    for c in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        conf += [c] * 1000
        hits = round(c * 1000)
        correct += [1] * hits + [0] * (1000 - hits)
    assert expected_calibration_error(torch.tensor(conf, dtype=torch.float64),
                                      torch.tensor(correct)) == \
        pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_over_confident_predictor_is_its_gap():
    # 95% confident, right 60% of the time: ECE = 0.35; half at 0.95/60%, half at
    # 0.65/40% (another bin): ECE = (0.35 + 0.25) / 2
    conf = torch.full((1000,), 0.95)
    correct = torch.tensor([1] * 600 + [0] * 400)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.35)
    conf2 = torch.cat([conf, torch.full((1000,), 0.65)])
    correct2 = torch.cat([correct, torch.tensor([1] * 400 + [0] * 600)])
    assert expected_calibration_error(conf2, correct2) == pytest.approx(0.30)


def test_ece_gaps_do_not_cancel_across_bins():
    # under-confident in one bin, over-confident in another: the gaps add up
    conf = torch.tensor([0.25] * 100 + [0.85] * 100)
    correct = torch.tensor([1] * 75 + [0] * 25 + [1] * 35 + [0] * 65)
    assert expected_calibration_error(conf, correct) == pytest.approx((0.5 + 0.5) / 2)


class _FixedPredictor(torch.nn.Module):
    """Predicts token 1 with probability ``p`` (token 0 otherwise) at every position."""

    def __init__(self, p: float, vocab: int = 4) -> None:
        super().__init__()
        logits = torch.full((vocab,), -30.0)
        logits[0], logits[1] = math.log(1 - p), math.log(p)
        self.register_buffer("row", logits)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())


def _fixed_lm(p: float) -> AdaptedModel:
    from flwr.app import ArrayRecord

    return AdaptedModel(_FixedPredictor(p), None, torch.device("cpu"), None,
                        initial_adapter=ArrayRecord())


@pytest.fixture(scope="module")
def coin_blocks() -> torch.Tensor:
    """Tokens drawn independently: 1 with probability 0.8, else 0."""
    gen = torch.Generator().manual_seed(3)
    return (torch.rand(64, 65, generator=gen) < 0.8).long()


def test_evaluated_ece_of_a_calibrated_model_is_near_zero(coin_blocks):
    result = evaluate_blocks(_fixed_lm(0.8), coin_blocks, batch_size=16)
    # 4096 tokens: the accuracy of a 0.8-confident guess is 0.8 ± 0.006
    assert result.ece < 0.02
    # and the loss is the entropy of the coin
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert result.loss == pytest.approx(entropy, abs=0.02)


def test_evaluated_ece_of_an_over_confident_model_is_its_gap(coin_blocks):
    result = evaluate_blocks(_fixed_lm(0.99), coin_blocks, batch_size=16)
    accuracy = (coin_blocks[:, 1:] == 1).double().mean().item()
    assert result.ece == pytest.approx(0.99 - accuracy, abs=1e-6)
    assert result.ece > 0.15


# --- drift from the base model ----------------------------------------------------------

def _perturb(lm, scale: float = 0.5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def test_kl_divergence_matches_torch():
    gen = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(3, 5, 11, generator=gen), dim=-1)
    other = torch.log_softmax(torch.randn(3, 5, 11, generator=gen), dim=-1)
    expected = F.kl_div(other, base, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(base, other), expected, atol=1e-6)
    assert torch.allclose(kl_divergence(base, base), torch.zeros(3, 5), atol=1e-7)


def test_kl_to_base_is_zero_for_the_fresh_adapter(fresh_lm, text_blocks):
    result = evaluate_blocks(fresh_lm, text_blocks[:4], batch_size=2, kl_to_base=True)
    assert result.kl_to_base == pytest.approx(0.0, abs=1e-6)
    assert evaluate_blocks(fresh_lm, text_blocks[:4], batch_size=2).kl_to_base is None


def test_kl_to_base_matches_a_manual_computation(fresh_lm, text_blocks):
    blocks = text_blocks[:3]
    _perturb(fresh_lm)
    result = evaluate_blocks(fresh_lm, blocks, batch_size=2, kl_to_base=True)
    model = fresh_lm.model.eval()
    with torch.no_grad():
        adapted = torch.log_softmax(model(input_ids=blocks).logits[:, :-1], -1)
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=blocks).logits[:, :-1], -1)
    manual = (base.exp() * (base - adapted)).sum(-1).mean().item()
    assert result.kl_to_base == pytest.approx(manual, rel=1e-4)
    assert result.kl_to_base > 1e-3
    # the adapter is back on afterwards: the loss is the adapted model's
    assert result.loss == pytest.approx(sum(_manual_losses(model, blocks)) / 3, abs=1e-4)


def test_evaluate_kinds_reports_each_kind_and_the_blocks_together(fresh_lm, text_blocks):
    _perturb(fresh_lm)
    kinds = {"a": text_blocks[:2], "b": text_blocks[2:5]}
    per_kind, overall = evaluate_kinds(fresh_lm, kinds, batch_size=4, kl_to_base=True)
    alone = {k: evaluate_blocks(fresh_lm, v, batch_size=4, kl_to_base=True)
             for k, v in kinds.items()}
    together = evaluate_blocks(fresh_lm, text_blocks[:5], batch_size=4, kl_to_base=True)
    for k in kinds:
        assert per_kind[k].loss == pytest.approx(alone[k].loss, abs=1e-6)
        assert per_kind[k].ece == pytest.approx(alone[k].ece, abs=1e-6)
        assert per_kind[k].kl_to_base == pytest.approx(alone[k].kl_to_base, rel=1e-5)
    # overall is block-weighted, with calibration bins pooled (not an average of ECEs)
    assert overall.loss == pytest.approx(together.loss, abs=1e-6)
    assert overall.ece == pytest.approx(together.ece, abs=1e-6)
    assert overall.kl_to_base == pytest.approx(together.kl_to_base, rel=1e-5)
    assert overall.tokens == 5 * (text_blocks.shape[1] - 1)


def _adapter_off_passes(lm, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = lm.model.disable_adapter
    monkeypatch.setattr(lm.model, "disable_adapter", lambda: calls.append(1) or real())
    return calls


def test_kept_base_logprobs_give_the_same_kl_without_an_adapter_off_pass(
        fresh_lm, text_blocks, monkeypatch):
    kinds = {"a": text_blocks[:3], "b": text_blocks[3:7]}
    off_passes = _adapter_off_passes(fresh_lm, monkeypatch)
    base = BaseLogprobs()
    evaluate_kinds(fresh_lm, kinds, batch_size=2, kl_to_base=True, kl_blocks=3, base=base)
    assert off_passes == []  # round 0: the fresh adapter's own log-probs are the base's
    for seed in (0, 1):  # two later rounds, each a different adapter
        _perturb(fresh_lm, seed=seed)
        kept, _ = evaluate_kinds(fresh_lm, kinds, batch_size=2, kl_to_base=True, kl_blocks=3,
                                 base=base)
        fresh, _ = evaluate_kinds(fresh_lm, kinds, batch_size=2, kl_to_base=True,
                                  kl_blocks=3)
        for k in kinds:
            assert kept[k].kl_to_base == pytest.approx(fresh[k].kl_to_base, rel=1e-5)
            assert kept[k].kl_to_base > 1e-3
    assert len(off_passes) == 2 * 4  # only the runs without kept log-probs (4 KL batches)


def test_base_logprobs_beyond_the_budget_are_recomputed(fresh_lm, text_blocks, monkeypatch):
    kinds = {"a": text_blocks[:4]}
    _perturb(fresh_lm)
    off_passes = _adapter_off_passes(fresh_lm, monkeypatch)
    base = BaseLogprobs(max_bytes=1)
    first, _ = evaluate_kinds(fresh_lm, kinds, batch_size=2, kl_to_base=True, base=base)
    again, _ = evaluate_kinds(fresh_lm, kinds, batch_size=2, kl_to_base=True, base=base)
    assert base.bytes == 0 and len(off_passes) == 4  # nothing kept: every pass again
    assert again["a"].kl_to_base == pytest.approx(first["a"].kl_to_base, rel=1e-6)


def test_kl_on_the_first_blocks_of_each_kind_is_the_kl_of_those_blocks(fresh_lm, text_blocks):
    _perturb(fresh_lm)
    kinds = {"a": text_blocks[:3], "b": text_blocks[3:7]}
    per_kind, overall = evaluate_kinds(fresh_lm, kinds, batch_size=3, kl_to_base=True,
                                       kl_blocks=2)
    full, _ = evaluate_kinds(fresh_lm, kinds, batch_size=3)
    for name, blocks in kinds.items():
        first = evaluate_blocks(fresh_lm, blocks[:2], batch_size=3, kl_to_base=True)
        assert per_kind[name].kl_to_base == pytest.approx(first.kl_to_base, rel=1e-5)
        # loss and calibration still cover every block of the kind
        assert per_kind[name].block_losses == pytest.approx(full[name].block_losses, abs=1e-6)
        assert per_kind[name].ece == pytest.approx(full[name].ece, abs=1e-6)
    both = evaluate_blocks(fresh_lm, torch.cat([text_blocks[:2], text_blocks[3:5]]),
                           batch_size=4, kl_to_base=True)
    assert overall.kl_to_base == pytest.approx(both.kl_to_base, rel=1e-5)


def test_a_fresh_adapter_needs_no_base_pass_and_has_zero_kl(fresh_lm, text_blocks, monkeypatch):
    assert adapter_is_identity(fresh_lm.model)
    monkeypatch.setattr(fresh_lm.model, "disable_adapter",
                        lambda: pytest.fail("a second, adapter-off pass ran"))
    result = evaluate_blocks(fresh_lm, text_blocks[:4], batch_size=2, kl_to_base=True)
    assert result.kl_to_base == 0.0
    _perturb(fresh_lm)
    assert not adapter_is_identity(fresh_lm.model)
