"""What changed, in words: greedy continuations of fixed prompts by the base model
(adapter disabled) and by the adapted model, side by side.

The prompts come from the scenario (``[report]``), never from a site's data, and are
continued as plain text (no chat frame): continued pretraining changes how text goes on.
Greedy decoding makes the continuations deterministic for a given adapter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from fedcpt.core.model import AdaptedModel

Kind = Literal["general", "domain"]


@dataclass(frozen=True)
class Continuation:
    """One prompt and how the base model and the adapted model continue it."""

    kind: Kind
    prompt: str
    base: str
    adapted: str


def _greedy(lm: AdaptedModel, ids: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of ``ids`` (new tokens only, cut after the first EOS)."""
    tok = lm.tokenizer
    inputs = torch.tensor([ids], device=lm.device)  # (1, T)
    with lm.autocast():
        out = lm.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


@torch.no_grad()
def continuations(lm: AdaptedModel, prompts: list[tuple[Kind, str]],
                  max_new_tokens: int) -> list[Continuation]:
    """Each ``(kind, prompt)`` continued by the base model and by ``lm``'s current adapter."""
    model = lm.model
    was_training = model.training
    model.eval()
    result = []
    for kind, prompt in prompts:
        ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with model.disable_adapter():
            base = _greedy(lm, ids, max_new_tokens)
        result.append(Continuation(kind, prompt, base, _greedy(lm, ids, max_new_tokens)))
    model.train(was_training)
    return result


def save_continuations(path: Path, items: list[Continuation]) -> None:
    path.write_text(json.dumps([asdict(c) for c in items], indent=1, ensure_ascii=False)
                    + "\n", encoding="utf-8")

