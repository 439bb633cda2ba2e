"""The server's general text, in kinds: evaluation blocks per kind and a rehearsal pool
drawn from the in-pool kinds with a stated mix.

A kind with ``rehearsal_share > 0`` is split by document hash (:mod:`fedcpt.core.data`):
its held-out documents are evaluated, the rest may enter the pool. A kind with share 0 is
never trained on, so all of its documents are evaluation text. The pool takes from each
in-pool kind in proportion to its share, as many blocks as the scarcest kind allows, and
is shuffled with a fixed seed before the validation slice is cut from its front, so the
validation slice has the pool's mix too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedcpt.config import DataConfig, GeneralSet
from fedcpt.core.data import deduplicate, load_blocks, pack, read_texts, split_documents, spread
from fedcpt.exceptions import DataError

log = logging.getLogger(__name__)

POOL_SHUFFLE_SEED = 0


@dataclass(frozen=True)
class GeneralCorpus:
    """What the server holds: evaluation blocks per kind (no training sees them), and a
    rehearsal pool (minus a validation slice) that server steps may train on."""

    evaluation: dict[str, torch.Tensor]
    in_pool: tuple[str, ...]
    pool: torch.Tensor
    validation: torch.Tensor
    mix: dict[str, int]
    """Blocks each in-pool kind contributed to pool + validation."""

    @property
    def out_of_pool(self) -> tuple[str, ...]:
        return tuple(k for k in self.evaluation if k not in self.in_pool)


def all_blocks(sources: tuple[str, ...], tokenizer: PreTrainedTokenizerBase,
               data: DataConfig, what: str) -> torch.Tensor:
    """Every document of ``sources`` packed into blocks (for a kind nothing trains on)."""
    texts: list[str] = []
    for spec in sources:
        found = read_texts(spec, data.text_field)
        if not any(t.strip() for t in found):
            raise DataError(f"{what}: source {spec!r} contains no text")
        texts.extend(found)
    documents = deduplicate(split_documents(texts), what)
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    blocks = pack(ids, tokenizer.eos_token_id, data.block_size)
    if len(blocks) == 0:
        raise DataError(f"{what}: too little text for one block of {data.block_size} tokens")
    return blocks


def pool_counts(available: dict[str, int], shares: dict[str, float]) -> dict[str, int]:
    """Blocks to take per kind so the pool follows ``shares`` (normalised): the largest
    pool that no kind runs short of."""
    total = sum(shares.values())
    if total <= 0:
        return {}
    fractions = {k: s / total for k, s in shares.items() if s > 0}
    size = min(available[k] / f for k, f in fractions.items())
    return {k: int(size * f) for k, f in fractions.items()}


def mix_pool(train: dict[str, torch.Tensor], shares: dict[str, float],
             seed: int = POOL_SHUFFLE_SEED) -> tuple[torch.Tensor, dict[str, int]]:
    """The shuffled rehearsal pool drawn from each kind's training blocks by ``shares``,
    and the blocks taken per kind."""
    counts = pool_counts({k: len(v) for k, v in train.items()}, shares)
    if not counts or not any(counts.values()):
        return torch.empty(0, 0, dtype=torch.long), counts
    pool = torch.cat([spread(train[k], n) for k, n in counts.items() if n])
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[order], counts


def load_general(data: DataConfig, tokenizer: PreTrainedTokenizerBase, *,
                 validation_blocks: int) -> GeneralCorpus:
    """Read every general kind of ``data`` into evaluation blocks and a mixed pool."""
    evaluation: dict[str, torch.Tensor] = {}
    train: dict[str, torch.Tensor] = {}
    shares: dict[str, float] = {}
    kind: GeneralSet
    for kind in data.general_kinds():
        what = f"general kind {kind.name!r}"
        if kind.rehearsal_share > 0:
            blocks = load_blocks(kind.sources, tokenizer, data, what=what)
            evaluation[kind.name] = spread(blocks.heldout, data.general_eval_blocks)
            train[kind.name] = blocks.train
            shares[kind.name] = kind.rehearsal_share
        else:
            evaluation[kind.name] = spread(all_blocks(kind.sources, tokenizer, data, what),
                                           data.general_eval_blocks)
    pool, mix = mix_pool(train, shares)
    log.info("general text: %s evaluated; rehearsal pool of %d blocks (%s)",
             ", ".join(f"{k} {len(v)} blocks" for k, v in evaluation.items()), len(pool),
             ", ".join(f"{k} {n}" for k, n in mix.items()) or "no in-pool kind")
    return GeneralCorpus(evaluation, tuple(shares), pool[validation_blocks:],
                         pool[:validation_blocks], mix)
