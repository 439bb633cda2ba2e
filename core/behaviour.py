"""Retention of the base model's own answers: does the adapted model still answer as the
base did?

Once per run the server asks the base model (adapter disabled) a fixed set of
instruction prompts in the model's chat format and keeps its greedy answers. Each round
it scores the adapted model on those answers, teacher-forced in one forward pass:

- ``loss``: mean token loss of the base answers (nats);
- ``exact_match``: share of answers the adapted model reproduces under greedy decoding.
  Greedy decoding emits the base answer exactly when, at every position of it, the
  adapted model's most likely next token given the prompt and the answer so far is the
  answer's next token (by induction over positions), so the teacher-forced argmax decides
  it without generating;
- ``token_agreement``: share of answer tokens where that argmax agrees.

The prompts are the project's own (no external data), spread over the registers a user
asks an instruct model about.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedcpt.core.model import AdaptedModel

log = logging.getLogger(__name__)

INSTRUCTION_PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence what a prime number is.",
    "Write a Python function that returns the square of a number.",
    "Give me three tips for staying focused while studying.",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water at sea level in Celsius?",
    "Summarise the water cycle in two sentences.",
    "Name the planets of the solar system in order from the Sun.",
    "How do I reverse a list in Python?",
    "Write a short, friendly reply to a colleague who thanked me for my help.",
    "What does an open-source software license allow people to do?",
    "Explain the difference between a list and a tuple in Python.",
    "What is 12 multiplied by 7?",
    "Suggest a name for a small bakery.",
    "Why is the sky blue? Answer briefly.",
    "Write a haiku about autumn.",
    "What is photosynthesis?",
    "How many days are there in a leap year?",
    "Give one example of a renewable energy source.",
    "What does the HTTP status code 404 mean?",
    "Describe a cat to someone who has never seen one, in one sentence.",
    "What is the past tense of the verb 'to run'?",
    "Write a SQL query that selects all rows from a table named users.",
    "What should I do if I forget my password?",
)
REHEARSAL_PROMPTS = (
    "What is the capital of Italy?",
    "Explain in one sentence what an even number is.",
    "Write a Python function that adds two numbers.",
    "Give me two tips for sleeping well.",
    "Translate 'thank you' into French.",
    "At what temperature does water freeze, in Celsius?",
    "Summarise what a volcano is in two sentences.",
    "Name three colours of the rainbow.",
    "How do I sort a list in Python?",
    "Write a short, polite email declining a meeting invitation.",
    "What is a spreadsheet used for?",
    "Explain the difference between a function and a method in Python.",
    "What is 9 plus 15?",
    "Suggest a name for a pet goldfish.",
    "Why do leaves change colour in autumn? Answer briefly.",
    "Write a two-line poem about the sea.",
    "What is gravity?",
    "How many minutes are there in an hour?",
    "Give one example of a mammal that lives in the ocean.",
    "What does the HTTP status code 200 mean?",
    "Describe a bicycle in one sentence.",
    "What is the plural of the word 'mouse'?",
    "Write a SQL query that counts the rows of a table named orders.",
    "What should I pack for a day at the beach?",
)
"""Prompts for chat-format rehearsal (:mod:`fedcpt.server.steps.self_distillation`),
disjoint from :data:`INSTRUCTION_PROMPTS`: the answers the base model gives to these are
trained on, so retention is still measured on prompts no step has seen."""
PLAIN_CHAT_FORMAT = "User: {prompt}\nAssistant:"


@dataclass(frozen=True)
class BaseAnswer:
    """One prompt (as chat-formatted token ids) and the base model's greedy answer."""

    prompt: str
    prompt_ids: list[int]
    answer_ids: list[int]
    text: str


def save_answers(path: Path, answers: list[BaseAnswer]) -> None:
    """Write the base answers as JSON (kept in the run folder: a resumed run scores the
    same answers, and a reader can see what the base said)."""
    path.write_text(json.dumps([asdict(a) for a in answers], indent=1, ensure_ascii=False)
                    + "\n", encoding="utf-8")


def load_answers(path: Path) -> list[BaseAnswer]:
    return [BaseAnswer(**raw) for raw in json.loads(path.read_text(encoding="utf-8"))]


@dataclass(frozen=True)
class AnswerRetention:
    """How the adapted model scores on the base model's answers."""

    loss: float
    exact_match: float
    token_agreement: float
    tokens: int
    matches: tuple[bool, ...]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``prompt`` as one user turn plus the assistant's turn opening, in the tokenizer's
    chat template (a plain ``User:/Assistant:`` frame for a tokenizer without one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = PLAIN_CHAT_FORMAT.format(prompt=prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def base_answers(lm: AdaptedModel, prompts: tuple[str, ...] | list[str],
                 max_new_tokens: int) -> list[BaseAnswer]:
    """The base model's greedy answers (adapter disabled), decoded in one left-padded batch,
    each cut after its first EOS. Batched decoding rounds differently from one teacher-
    forced pass; an answer is cut before the first token the base model's own teacher-
    forced argmax disagrees with, so the base reproduces every answer exactly."""
    model, tok = lm.model, lm.tokenizer
    was_training = model.training
    model.eval()
    eos = tok.eos_token_id
    prompt_ids = [chat_prompt_ids(tok, prompt) for prompt in prompts]
    width = max(len(ids) for ids in prompt_ids)
    inputs = torch.full((len(prompt_ids), width), eos, dtype=torch.long)
    mask = torch.zeros_like(inputs)
    for i, ids in enumerate(prompt_ids):
        inputs[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    with model.disable_adapter(), lm.autocast():
        out = model.generate(input_ids=inputs.to(lm.device), attention_mask=mask.to(lm.device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
        answers = []
        for prompt, ids, row in zip(prompts, prompt_ids, out[:, width:].tolist(), strict=True):
            answer = row[:row.index(eos) + 1] if eos in row else row
            answer = answer[:_agreeing_prefix(lm, ids, answer)]
            answers.append(BaseAnswer(prompt, ids, answer,
                                      tok.decode(answer, skip_special_tokens=True)))
    model.train(was_training)
    return answers


def _agreeing_prefix(lm: AdaptedModel, prompt_ids: list[int], answer: list[int]) -> int:
    """How many leading answer tokens the model's teacher-forced argmax reproduces."""
    if not answer:
        return 0
    ids = torch.tensor([prompt_ids + answer], device=lm.device)
    logits = lm.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]
    same = (logits.argmax(dim=-1).cpu() == torch.tensor(answer)).tolist()
    return same.index(False) if False in same else len(answer)


@torch.no_grad()
def answer_retention(lm: AdaptedModel, answers: list[BaseAnswer]) -> AnswerRetention:
    """Teacher-forced loss, greedy exact-match rate and token agreement of the adapted
    model on the base model's answers."""
    model = lm.model
    was_training = model.training
    model.eval()
    nll_sum, agree, tokens, matches = 0.0, 0, 0, []
    for a in answers:
        ids = torch.tensor([a.prompt_ids + a.answer_ids], device=lm.device)
        with lm.autocast():
            logits = model(input_ids=ids).logits[0].float()  # (L, V)
        n, start = len(a.answer_ids), len(a.prompt_ids) - 1
        logprobs = torch.log_softmax(logits[start:start + n], dim=-1)  # (n, V)
        target = ids[0, start + 1:start + 1 + n]
        nll_sum += -logprobs.gather(-1, target.unsqueeze(-1)).sum().item()
        same = logprobs.argmax(dim=-1) == target
        agree += int(same.sum().item())
        tokens += n
        matches.append(bool(same.all().item()))
    model.train(was_training)
    if not tokens:
        raise ValueError("base answers hold no tokens")  # a bug: base_answers never does this
    return AnswerRetention(loss=nll_sum / tokens, exact_match=sum(matches) / len(matches),
                           token_agreement=agree / tokens, tokens=tokens,
                           matches=tuple(matches))


def answer_batch(answers: list[BaseAnswer], pad_id: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + answer token ids, right-padded with ``pad_id`` (N, L), and the predictions
    that produce each answer (N, L − 1, bool). Under causal attention right padding never
    changes the scored positions, so no attention mask is needed."""
    width = max(len(a.prompt_ids) + len(a.answer_ids) for a in answers)
    ids = torch.full((len(answers), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(answers), width - 1, dtype=torch.bool)
    for i, a in enumerate(answers):
        seq = a.prompt_ids + a.answer_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        start = len(a.prompt_ids) - 1  # the prediction of the answer's first token
        positions[i, start:start + len(a.answer_ids)] = True
    return ids, positions
