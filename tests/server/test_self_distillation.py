"""Self-distillation toward the base model: it removes drift from the base on held-out
text (measured against no step from the same adapted start), it trains the adapter only,
and its settings are checked."""

from __future__ import annotations

import pytest
import torch

from fedcpt.config import TrainConfig, load_config
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.core.behaviour import (
    INSTRUCTION_PROMPTS,
    REHEARSAL_PROMPTS,
    answer_batch,
    answer_retention,
    base_answers,
)
from fedcpt.core.data import pack
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.training import train_adapter
from fedcpt.exceptions import ConfigError
from fedcpt.server.steps.self_distillation import ScoredText, SelfDistillation


def _blocks(tok, text: str) -> torch.Tensor:
    return pack(tok([text], add_special_tokens=False)["input_ids"], tok.eos_token_id, 64)


@pytest.fixture
def drifted(fresh_lm, text_blocks):
    """An aggregate trained away from the base on the domain blocks (B ≠ 0)."""
    train_adapter(fresh_lm, text_blocks, TrainConfig(local_steps=15, batch_size=4), lr=5e-2,
                  seed=0)
    return to_arrays(adapter_state(fresh_lm.model))


def _step(lm, **kw) -> SelfDistillation:
    settings = dict(pool=None, chat=None, steps=12, batch_size=4, lr=5e-2,
                    lr_at=lambda r: 5e-2, chat_weight=1.0, max_grad_norm=1.0, seed=0)
    return SelfDistillation(lm, **{**settings, **kw})


def test_pool_distillation_removes_most_kl_to_base_on_heldout_text(fresh_lm, byte_tok,
                                                                   drifted, make_text):
    pool = _blocks(byte_tok, make_text(6000, seed=21) + "\ndef f(x):\n    return x\n" * 30)
    heldout = _blocks(byte_tok, make_text(3000, seed=22))[:12]  # never in the pool
    load_adapter(fresh_lm.model, drifted)
    without = evaluate_blocks(fresh_lm, heldout, 8, kl_to_base=True).kl_to_base
    result = _step(fresh_lm, pool=pool).apply(1, drifted, drifted, client_examples=60)
    load_adapter(fresh_lm.model, result.arrays)
    with_step = evaluate_blocks(fresh_lm, heldout, 8, kl_to_base=True).kl_to_base
    assert without > 0.01  # the domain training moved the model: drift to remove
    assert with_step < 0.7 * without  # 0.024 → 0.013 here
    assert result.details["last_pool_kl"] < result.details["first_pool_kl"]
    assert not result.rejects_round


def test_chat_distillation_keeps_answers_to_prompts_it_never_saw(fresh_lm, drifted):
    held_out = base_answers(fresh_lm, INSTRUCTION_PROMPTS[:4], max_new_tokens=8)
    trained_on = base_answers(fresh_lm, REHEARSAL_PROMPTS, max_new_tokens=8)
    chat = ScoredText(*answer_batch(trained_on, fresh_lm.tokenizer.eos_token_id))
    load_adapter(fresh_lm.model, drifted)
    without = answer_retention(fresh_lm, held_out).loss
    result = _step(fresh_lm, chat=chat).apply(1, drifted, drifted, client_examples=60)
    load_adapter(fresh_lm.model, result.arrays)
    with_step = answer_retention(fresh_lm, held_out).loss
    with fresh_lm.model.disable_adapter():
        base = answer_retention(fresh_lm, held_out).loss
    assert without - base > 0.05
    assert with_step - base < 0.5 * (without - base)


def test_answer_batch_scores_exactly_the_answer_positions():
    from fedcpt.core.behaviour import BaseAnswer

    answers = [BaseAnswer("a", [1, 2, 3], [4, 5], "x"), BaseAnswer("b", [6], [7], "y")]
    ids, positions = answer_batch(answers, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    # prediction i is of token i + 1: the answer tokens are predicted at 2, 3 and at 0
    assert positions.tolist() == [[False, False, True, True], [True, False, False, False]]
    assert not set(REHEARSAL_PROMPTS) & set(INSTRUCTION_PROMPTS)


def test_distillation_changes_only_adapter_weights(fresh_lm, byte_tok, drifted, make_text):
    base_before = {n: p.detach().clone() for n, p in fresh_lm.model.named_parameters()
                   if "lora_" not in n}
    pool = _blocks(byte_tok, make_text(3000, seed=23))
    result = _step(fresh_lm, pool=pool, steps=3).apply(1, drifted, drifted, client_examples=0)
    assert result.arrays.keys() == drifted.keys()
    moved = [k for k in drifted if not torch.equal(torch.from_numpy(result.arrays[k].numpy()),
                                                   torch.from_numpy(drifted[k].numpy()))]
    assert moved  # the adapter was trained
    for name, param in fresh_lm.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_before[name]), name


@pytest.mark.parametrize(("override", "key"), [
    ("strategy.distillation=kl", "strategy.distillation"),
    ("strategy.distill_steps=0", "strategy.distill_steps"),
    ("strategy.distill_lr=-1", "strategy.distill_lr"),
    ("strategy.distill_chat_weight=0", "strategy.distill_chat_weight"),
    ("strategy.distill_batch_size=-1", "strategy.distill_batch_size"),
    ("strategy.distill_from_round=0", "strategy.distill_from_round"),
    ("strategy.distill_samples=0", "strategy.distill_samples"),
])
def test_bad_distillation_settings_are_rejected(override, key):
    with pytest.raises(ConfigError, match=f"`?{key}`?"):
        load_config("smoke", overrides=["strategy.distillation=pool", override])


def test_site_level_dp_refuses_distillation():
    with pytest.raises(ConfigError, match="privacy.user_level cannot be combined"):
        load_config("smoke", overrides=["privacy.user_level=true",
                                        "strategy.distillation=pool"])


def test_server_builds_distillation_after_rehearsal(sites_config, fresh_lm, text_blocks):
    from fedcpt.server.app import GeneralData, server_steps

    cfg = load_config("smoke", sites_config, ["strategy.rehearsal=mix",
                                              "strategy.distillation=both",
                                              "data.answer_tokens=2"])
    general = GeneralData({"prose": text_blocks}, ("prose",), text_blocks, text_blocks[:2])
    steps = server_steps(cfg, fresh_lm, general)
    assert [s.name for s in steps] == ["rehearsal", "self_distillation"]
    distill = steps[1]
    assert distill.pool.ids is general.rehearsal
    assert len(distill.chat.ids) == len(REHEARSAL_PROMPTS)


def test_distillation_waits_for_its_first_round(fresh_lm, byte_tok, drifted, make_text):
    """Distillation in late rounds only: before ``from_round`` the aggregate passes
    unchanged; from it on, the step trains."""
    pool = _blocks(byte_tok, make_text(3000, seed=24))
    step = _step(fresh_lm, pool=pool, steps=2, from_round=3)
    early = step.apply(2, drifted, drifted, client_examples=0)
    assert early.arrays is drifted and early.details == {"steps": 0}
    late = step.apply(3, drifted, drifted, client_examples=0)
    assert late.details["steps"] == 2
    assert any(not torch.equal(torch.from_numpy(late.arrays[k].numpy()),
                               torch.from_numpy(drifted[k].numpy())) for k in drifted)


def test_distillation_batch_is_its_own_or_the_sites(sites_config, fresh_lm, text_blocks):
    from fedcpt.server.app import GeneralData, self_distillation

    general = GeneralData({"prose": text_blocks}, ("prose",), text_blocks, text_blocks[:2])
    base = ["strategy.distillation=pool", "train.batch_size=6"]
    assert self_distillation(load_config("smoke", sites_config, base), fresh_lm,
                             general).batch_size == 6
    cfg = load_config("smoke", sites_config, [*base, "strategy.distill_batch_size=2",
                                              "strategy.distill_from_round=2"])
    step = self_distillation(cfg, fresh_lm, general)
    assert (step.batch_size, step.from_round) == (2, 2)


def _two_phases(server_round: int):
    """Phases of two rounds each (a third after round 4)."""
    from fedcpt.config import Phase

    index = (server_round - 1) // 2 if server_round else 0
    return Phase(index, f"phase-{index}", 2 * index + 1, 2 * index + 2, (f"site-{index}",))


def test_phase_teacher_keeps_the_previous_phase_where_the_base_teacher_would_not(
        fresh_lm, byte_tok, drifted, make_text):
    """A stream: phase 1 trained on prose (``drifted``), phase 2's aggregate on code. The
    phase teacher pulls toward phase 1's solution: the loss on held-out prose falls back
    toward phase 1's and the adapter is not pulled to the base."""
    from fedcpt.server.steps.self_distillation import PhaseTeacher

    code = _blocks(byte_tok, "def f(x):\n    return x * 2\n" * 200)
    load_adapter(fresh_lm.model, drifted)
    train_adapter(fresh_lm, code, TrainConfig(local_steps=15, batch_size=4), lr=5e-2, seed=1)
    phase2 = to_arrays(adapter_state(fresh_lm.model))
    pool = _blocks(byte_tok, make_text(6000, seed=25))
    heldout = _blocks(byte_tok, make_text(3000, seed=26))[:12]  # phase 1's register

    def prose_loss(arrays) -> float:
        load_adapter(fresh_lm.model, arrays)
        return evaluate_blocks(fresh_lm, heldout, 8).loss

    asked: list[int] = []
    teacher = PhaseTeacher(_two_phases, lambda r, layout: asked.append(r))
    step = _step(fresh_lm, pool=pool, phase_teacher=teacher)
    assert step.apply(2, drifted, drifted, client_examples=0).details == {"steps": 0}
    result = step.apply(3, drifted, phase2, client_examples=0)  # round 3 began from drifted
    after_phase1, forgot, kept = prose_loss(drifted), prose_loss(phase2), prose_loss(
        result.arrays)
    assert forgot - after_phase1 > 0.02  # phase 2 forgot prose: backward transfer to remove
    assert kept - after_phase1 < 0.5 * (forgot - after_phase1)
    assert result.details["teacher"] == "phase" and asked == []
    base = _step(fresh_lm, pool=pool).apply(3, drifted, phase2, client_examples=0)
    assert prose_loss(base.arrays) > kept  # toward the base, prose is not kept as well


def test_phase_teacher_of_a_resumed_run_is_the_committed_phase_start(fresh_lm, drifted):
    """Resumed inside phase 2: the teacher is the version committed before its first round,
    not the adapter the resumed round began from."""
    from fedcpt.core.adapters import from_arrays
    from fedcpt.server.steps.self_distillation import PhaseTeacher

    asked: list[int] = []

    def version(server_round: int, layout):
        asked.append(server_round)
        return drifted

    later = to_arrays({k: v + 1.0 for k, v in from_arrays(drifted).items()})
    teacher = PhaseTeacher(_two_phases, version)
    held = teacher.at(4, later)
    assert asked == [2]
    for key, value in from_arrays(drifted).items():
        assert torch.equal(held[key], value), key
    # the next phase's teacher is the adapter it begins from, not phase 2's kept one
    third = teacher.at(5, later)
    assert asked == [2]
    for key, value in from_arrays(later).items():
        assert torch.equal(third[key], value), key


def test_phase_teacher_needs_a_stream():
    with pytest.raises(ConfigError, match="strategy.distill_teacher"):
        load_config("smoke", overrides=["strategy.distillation=pool",
                                        "strategy.distill_teacher=phase"])
    cfg = load_config("smoke-stream", overrides=["strategy.distillation=pool",
                                                 "strategy.distill_teacher=phase"])
    assert cfg.strategy.distill_teacher == "phase"


def test_phase_teacher_with_pool_and_chat_trains_in_fp32(fresh_lm, byte_tok, drifted,
                                                         make_text):
    """`both` with the phase teacher: each kind's teacher swap comes after the previous
    kind's backward, so fp32 (where the graph holds the parameters themselves) trains."""
    from fedcpt.server.steps.self_distillation import PhaseTeacher

    pool = _blocks(byte_tok, make_text(3000, seed=27))
    trained_on = base_answers(fresh_lm, REHEARSAL_PROMPTS, max_new_tokens=8)
    chat = ScoredText(*answer_batch(trained_on, fresh_lm.tokenizer.eos_token_id))
    moved = to_arrays({k: v + 0.3 for k, v in adapter_state(fresh_lm.model).items()})
    step = _step(fresh_lm, pool=pool, chat=chat, steps=4, lr=1e-2,
                 phase_teacher=PhaseTeacher(_two_phases, lambda r, layout: drifted))
    result = step.apply(3, drifted, moved, client_examples=0)
    for kind in ("pool_kl", "chat_kl"):
        assert result.details[f"last_{kind}"] < result.details[f"first_{kind}"], kind


def test_the_phase_teacher_needs_the_runs_versions(sites_config, fresh_lm, text_blocks):
    from fedcpt.server.app import GeneralData, self_distillation

    general = GeneralData({"prose": text_blocks}, ("prose",), text_blocks, text_blocks[:2])
    cfg = load_config("smoke-stream", overrides=["strategy.distillation=pool",
                                                 "strategy.distill_teacher=phase"])
    with pytest.raises(ValueError, match="committed versions"):
        self_distillation(cfg, fresh_lm, general)
    step = self_distillation(cfg, fresh_lm, general, version=lambda r, layout: None)
    assert step.phase_teacher is not None


def test_distillation_on_the_base_models_samples_removes_kl_to_base(fresh_lm, drifted):
    """`samples`: the KL to the base falls on base samples the step never trained on."""
    from fedcpt.core.lm_loss import next_token_kl
    from fedcpt.core.samples import sample_text
    from fedcpt.server.steps.self_distillation import TeacherSamples

    with fresh_lm.model.disable_adapter():
        unseen = sample_text(fresh_lm, count=32, tokens=48, seed=99)

    def kl_on_unseen(arrays) -> float:
        load_adapter(fresh_lm.model, arrays)
        with torch.no_grad():
            return next_token_kl(fresh_lm.model, *unseen).item()

    samples = TeacherSamples(fresh_lm, count=32, tokens=48, seed=0)
    result = _step(fresh_lm, samples=samples).apply(1, drifted, drifted, client_examples=0)
    assert result.details["last_samples_kl"] < result.details["first_samples_kl"]
    assert result.details["teacher"] == "base"
    assert kl_on_unseen(drifted) > 0.01
    assert kl_on_unseen(result.arrays) < 0.8 * kl_on_unseen(drifted)  # 0.024 → 0.017


def test_phase_samples_come_from_every_phase_start_and_a_resumed_run_draws_the_same(
        fresh_lm, drifted):
    """In phase 2 of a stream the samples are those of phase 1's start and phase 2's, each
    drawn from that adapter; phase 3 adds its own; a run resumed in phase 2 reads phase
    1's start from its committed version and draws the same samples as the run that never
    stopped. Drawing leaves the student's adapter in the model."""
    from fedcpt.core.adapters import from_arrays, swapped_adapter
    from fedcpt.core.samples import sample_seed, sample_text
    from fedcpt.server.steps.self_distillation import PhaseTeacher, TeacherSamples

    later = to_arrays({k: v + 0.5 for k, v in adapter_state(fresh_lm.model).items()})
    last = to_arrays({k: v - 0.5 for k, v in adapter_state(fresh_lm.model).items()})
    versions = {2: drifted, 4: later, 6: last}  # committed before phases 1, 2 and 3

    def text_at(samples: TeacherSamples, teacher: PhaseTeacher, server_round: int, arrays):
        return samples.text(teacher.earlier_starts(server_round, arrays))

    asked: list[int] = []

    def version(server_round: int, layout):
        asked.append(server_round)
        return versions[server_round]

    student = {k: v.clone() for k, v in adapter_state(fresh_lm.model).items()}
    kept = TeacherSamples(fresh_lm, count=8, tokens=16, seed=0)
    teacher = PhaseTeacher(_two_phases, version)
    phase1 = text_at(kept, teacher, 3, drifted)
    assert phase1.ids.shape == (8, 17) and asked == []
    assert torch.equal(text_at(kept, teacher, 4, drifted).ids, phase1.ids) and asked == []
    phase2 = text_at(kept, teacher, 5, later)  # phase 2 began from `later`
    assert phase2.ids.shape == (16, 17) and torch.equal(phase2.ids[:8], phase1.ids)
    with swapped_adapter(fresh_lm.model, from_arrays(later)):
        from_later, _ = sample_text(fresh_lm, 8, 16, seed=sample_seed(0, 2))
    assert torch.equal(phase2.ids[8:], from_later)
    assert all(torch.equal(v, student[k])
               for k, v in adapter_state(fresh_lm.model).items())
    assert text_at(kept, teacher, 7, last).ids.shape == (24, 17) and asked == []

    resumed = text_at(TeacherSamples(fresh_lm, count=8, tokens=16, seed=0),
                      PhaseTeacher(_two_phases, version), 6, later)
    assert sorted(asked) == [2, 4]
    assert torch.equal(resumed.ids, phase2.ids)
    asked.clear()
    third = text_at(TeacherSamples(fresh_lm, count=8, tokens=16, seed=0),
                    PhaseTeacher(_two_phases, version), 8, last)  # resumed in phase 3
    assert sorted(asked) == [2, 4, 6] and torch.equal(third.ids[:16], phase2.ids)


def test_phase_replay_pulls_toward_the_phase_start_on_its_samples(fresh_lm, drifted):
    """`samples` with the phase teacher, end to end: the KL to the phase's start on its
    own samples falls over the steps, and the first phase is left alone."""
    from fedcpt.server.steps.self_distillation import PhaseTeacher, TeacherSamples

    moved = to_arrays({k: v + 0.3 for k, v in adapter_state(fresh_lm.model).items()})
    step = _step(fresh_lm, samples=TeacherSamples(fresh_lm, count=16, tokens=32, seed=0),
                 steps=6, lr=1e-2,
                 phase_teacher=PhaseTeacher(_two_phases, lambda r, layout: drifted))
    assert step.apply(1, drifted, moved, client_examples=0).details == {"steps": 0}
    result = step.apply(3, drifted, moved, client_examples=0)
    assert result.details["teacher"] == "phase"
    assert result.details["last_samples_kl"] < result.details["first_samples_kl"]
