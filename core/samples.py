"""The model's own text: ancestral samples from a fresh document, for distillation on the
teacher's own distribution (generative replay: Shin et al. 2017, "Continual Learning with
Deep Generative Replay", https://arxiv.org/abs/1705.08690; for language models: Sun et
al. 2020, LAMOL, https://arxiv.org/abs/1909.03329).

Sampling at temperature 1 with no truncation draws text from the model's distribution
itself, so a KL to it averaged over these samples estimates KL(teacher ‖ student) over the
text the teacher would write: what the teacher knows, in proportion. The samples are
post-processing of the adapter sampled and reveal nothing that adapter does not (without
DP, an adapter can have memorised site text, and so can its samples). Transformers'
``generate`` does the sampling.
"""

from __future__ import annotations

import zlib

import torch
from transformers import GenerationConfig

from fedcpt.core.model import AdaptedModel

CHUNK = 64
"""Sequences generated at once (bounds the KV cache and the logits)."""


def sample_seed(seed: int, key: int) -> int:
    """The sampling seed of teacher ``key`` in a run seeded ``seed``: its own stream, apart
    from the ``seed * 1000 + round`` streams that draw training batches."""
    return zlib.crc32(f"fedcpt.samples/{seed}/{key}".encode())


@torch.no_grad()
def sample_text(lm: AdaptedModel, count: int, tokens: int, seed: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` samples of up to ``tokens`` tokens from the model as loaded (the caller
    picks the teacher: the adapter disabled, or an earlier adapter swapped in), each
    starting after the tokenizer's end-of-text token (its ``eos_token``, the token
    :func:`fedcpt.core.data.pack` puts between documents). Returns the ids (count,
    tokens + 1), padded with that token after a sample ends, and the predictions of sampled
    tokens (count, tokens, bool), up to and including the sample's own end-of-text token.

    The same seed gives the same samples on the same device, threads and library versions
    (the draw also depends on :data:`CHUNK`)."""
    if count < 1 or tokens < 1:
        raise ValueError(f"sample_text needs count ≥ 1 and tokens ≥ 1, not {count}, {tokens}")
    eos = lm.tokenizer.eos_token_id
    # An explicit configuration, so that no model's own generation defaults (repetition
    # penalty, min_p, suppressed tokens) reshape the distribution sampled.
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=tokens, eos_token_id=eos, pad_token_id=eos)
    model = lm.model
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, count, CHUNK):
                prompt = torch.full((min(CHUNK, count - start), 1), eos, device=lm.device)
                with lm.autocast():
                    out = model.generate(input_ids=prompt,
                                         attention_mask=torch.ones_like(prompt),
                                         generation_config=settings)
                # generate stops early once every sample in the chunk has ended
                rows.append(torch.nn.functional.pad(out.cpu(),
                                                    (0, tokens + 1 - out.shape[1]), value=eos))
    finally:
        model.train(was_training)
    ids = torch.cat(rows)  # (count, tokens + 1)
    ended = ids[:, 1:] == eos
    # the predictions after a sample's first end-of-text token are padding
    positions = (ended.cumsum(1) - ended.long()) == 0
    return ids, positions
