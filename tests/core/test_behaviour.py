"""Retention of the base model's own answers: the chat frame, greedy base answers, and
teacher-forced exact match that agrees with real greedy decoding."""

from __future__ import annotations

import pytest
import torch

from fedcpt.core.behaviour import (
    INSTRUCTION_PROMPTS,
    PLAIN_CHAT_FORMAT,
    answer_retention,
    base_answers,
    chat_prompt_ids,
)

PROMPTS = INSTRUCTION_PROMPTS[:2]
TOKENS = 8


def _perturb(lm, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one(byte_tok):
    plain = chat_prompt_ids(byte_tok, "Hi?")
    assert byte_tok.decode(plain) == PLAIN_CHAT_FORMAT.format(prompt="Hi?")
    tok = byte_tok.__class__(tokenizer_object=byte_tok.backend_tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert tok.decode(chat_prompt_ids(tok, "Hi?")) == "<user>Hi?<assistant>"


def test_the_base_reproduces_its_own_answers(fresh_lm):
    answers = base_answers(fresh_lm, PROMPTS, TOKENS)
    assert [a.prompt for a in answers] == list(PROMPTS)
    assert all(0 < len(a.answer_ids) <= TOKENS for a in answers)
    kept = answer_retention(fresh_lm, answers)  # fresh adapter: B = 0, the base itself
    assert kept.exact_match == 1.0
    assert kept.token_agreement == 1.0
    assert kept.tokens == sum(len(a.answer_ids) for a in answers)
    assert kept.loss > 0


def test_an_answer_does_not_depend_on_the_prompts_decoded_beside_it(fresh_lm):
    prompts = INSTRUCTION_PROMPTS[:4]  # of different lengths: the batch is left-padded
    assert len({len(chat_prompt_ids(fresh_lm.tokenizer, p)) for p in prompts}) > 1
    together = base_answers(fresh_lm, prompts, TOKENS)
    alone = [base_answers(fresh_lm, [p], TOKENS)[0] for p in prompts]
    assert [a.answer_ids for a in together] == [a.answer_ids for a in alone]


def test_answers_are_generated_with_the_adapter_disabled(fresh_lm):
    before = base_answers(fresh_lm, PROMPTS, TOKENS)
    _perturb(fresh_lm, 1.0)
    assert [a.answer_ids for a in base_answers(fresh_lm, PROMPTS, TOKENS)] == \
        [a.answer_ids for a in before]


@pytest.mark.parametrize("scale", [0.05, 2.0])
def test_teacher_forced_exact_match_equals_greedy_decoding(fresh_lm, scale):
    answers = base_answers(fresh_lm, PROMPTS, TOKENS)
    _perturb(fresh_lm, scale)
    kept = answer_retention(fresh_lm, answers)
    model = fresh_lm.model.eval()
    eos = fresh_lm.tokenizer.eos_token_id
    for answer, match in zip(answers, kept.matches, strict=True):
        ids = torch.tensor([answer.prompt_ids])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=TOKENS, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)
        generated = out[0, ids.shape[1]:].tolist()
        if eos in generated:
            generated = generated[:generated.index(eos) + 1]
        assert (generated == answer.answer_ids) == match
    if scale > 1:  # a large move changes what the model answers, and how likely the answers are
        assert kept.exact_match < 1.0 and kept.token_agreement < 1.0
        assert kept.loss > answer_retention_at_base(fresh_lm, answers)


def answer_retention_at_base(lm, answers) -> float:
    with lm.model.disable_adapter():
        return answer_retention(lm, answers).loss


def test_base_answers_round_trip_through_json(fresh_lm, tmp_path):
    from fedcpt.core.behaviour import load_answers, save_answers

    answers = base_answers(fresh_lm, PROMPTS[:1], 4)
    save_answers(tmp_path / "answers.json", answers)
    assert load_answers(tmp_path / "answers.json") == answers
