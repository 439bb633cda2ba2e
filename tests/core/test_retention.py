"""GeneralEvaluation and the retention summary: forgetting per kind, in and out of the
rehearsal pool, and behaviour kept."""

from __future__ import annotations

import pytest
import torch

from fedcpt.config import DataConfig
from fedcpt.core.retention import GeneralEvaluation, GeneralReport, retention_summary


def _perturb(lm, scale: float) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture
def evaluation(fresh_lm, text_blocks) -> GeneralEvaluation:
    kinds = {"prose": text_blocks[:2], "code": text_blocks[2:4], "legal": text_blocks[4:6]}
    data = DataConfig(answer_prompts=2, answer_tokens=6)
    return GeneralEvaluation.prepare(fresh_lm, kinds, ("prose", "code"), data, batch_size=4)


def test_base_report_has_no_drift(fresh_lm, evaluation):
    base = evaluation.evaluate(fresh_lm)
    assert set(base.kinds) == {"prose", "code", "legal"}
    assert evaluation.out_of_pool == ("legal",)
    assert base.overall.kl_to_base == pytest.approx(0.0, abs=1e-6)
    assert base.answers.exact_match == 1.0
    summary = retention_summary(base, base, evaluation.in_pool)
    assert summary.overall.forgetting == 0.0
    assert summary.behaviour.answer_loss_increase == 0.0


def test_summary_groups_kinds_in_and_out_of_the_pool(fresh_lm, evaluation):
    base = evaluation.evaluate(fresh_lm)
    _perturb(fresh_lm, 1.0)
    after = evaluation.evaluate(fresh_lm)
    s = retention_summary(base, after, evaluation.in_pool)
    for kind in ("prose", "code", "legal"):
        assert s.kinds[kind].forgetting == pytest.approx(
            after.kinds[kind].loss - base.kinds[kind].loss)
    # in-pool = the blocks of prose and code together (equal block counts: the mean)
    assert s.in_pool.forgetting == pytest.approx(
        (s.kinds["prose"].forgetting + s.kinds["code"].forgetting) / 2)
    assert s.out_of_pool.forgetting == pytest.approx(s.kinds["legal"].forgetting)
    assert s.overall.forgetting == pytest.approx(after.overall.loss - base.overall.loss)
    assert s.behaviour.kl_to_base > 0
    assert s.behaviour.answer_loss_increase == pytest.approx(
        after.answers.loss - base.answers.loss)
    assert s.eces["legal"] == (base.kinds["legal"].ece, after.kinds["legal"].ece)
    # a report survives the checkpoint's JSON round trip
    assert GeneralReport.from_dict(after.to_dict()) == after
    assert s.to_dict()["behaviour"]["kl_to_base"] == s.behaviour.kl_to_base


def test_more_prompts_than_built_in_is_a_config_error(fresh_lm, text_blocks):
    from fedcpt.core.behaviour import INSTRUCTION_PROMPTS
    from fedcpt.exceptions import ConfigError

    data = DataConfig(answer_prompts=len(INSTRUCTION_PROMPTS) + 1)
    with pytest.raises(ConfigError, match=r"data.answer_prompts.*at most the 24 built-in"):
        GeneralEvaluation.prepare(fresh_lm, {"a": text_blocks[:1]}, (), data, batch_size=1)
