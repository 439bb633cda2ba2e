"""The property the unit-level guarantee rests on: removing any one privacy unit from a
site's data changes only that unit's blocks — on the trained side and the held-out side —
under every cap (``train_share``), unit kind and block size a site allows.

A hand-rolled loop over seeds: each seed draws a salt, a corpus and the units to remove.
The corpus is large enough that the held-out split's small-corpus fallback (which moves one
unit when the hash leaves a side empty) never fires, and the test checks that it did not.
"""

from __future__ import annotations

import random

import pytest
import torch

from fedcpt.core.data import (
    UNIT_KINDS,
    blocks_of_units,
    group_units,
    heldout_by_hash,
    is_heldout,
    kept_by_hash,
    pack_units,
)
from fedcpt.core.sources import Record
from fedcpt.privacy.policy import SITE_DEFAULTS

FRACTION = 0.3
SHARES = (1.0, 0.5, 0.25)  # no cap, and two caps
BLOCK_SIZES = SITE_DEFAULTS["block_sizes"]  # what a deployed site allows by default
UNITS = [k if k != "field" else "field:user_id" for k in UNIT_KINDS]
SEEDS = range(2)
REMOVALS = 3  # units removed per seed: trained, held-out and capped-out ones alike


def _corpus(seed: int, english_text) -> list[Record]:
    """30 folders of 2 files of 3 records by 50 users, 300-2,500 characters each, with one
    boilerplate text repeated in several folders (one `document` unit across them)."""
    rng = random.Random(seed)
    boiler = english_text(700, seed=10_000 + seed)
    records = []
    for folder in range(30):
        for file in range(2):
            for _ in range(3):
                text = (boiler if rng.random() < 0.03 else
                        english_text(rng.randint(300, 2500), seed=rng.randrange(2**31)))
                records.append(Record(text, f"/site/d{folder}/f{file}.jsonl",
                                      f"u{rng.randrange(50)}"))
    return records


class _MemoTokenizer:
    """The byte tokenizer, each document tokenised once (the loop rebuilds one corpus
    hundreds of times; the ids are the tokenizer's own)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.eos_token_id, self.ids = tokenizer, tokenizer.eos_token_id, {}

    def __call__(self, docs: list[str], add_special_tokens: bool) -> dict:
        new = [d for d in dict.fromkeys(docs) if d not in self.ids]
        if new:
            ids = self.tokenizer(new, add_special_tokens=add_special_tokens)["input_ids"]
            self.ids.update(zip(new, ids, strict=True))
        return {"input_ids": [self.ids[d] for d in docs]}


def _groups(blocks: torch.Tensor, owners: torch.Tensor) -> list[torch.Tensor]:
    """Each unit's blocks, in unit order."""
    return [blocks[owners == i] for i in range(int(owners.max()) + 1)] if len(owners) else []


def _only_removed(before: list[torch.Tensor], after: list[torch.Tensor],
                  removed: torch.Tensor) -> bool:
    """``after`` is ``before`` less one group equal to ``removed`` (or ``before`` itself
    when the removed unit had no blocks on this side)."""
    if len(before) == len(after):
        return all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    if len(before) != len(after) + 1:
        return False
    pairs = enumerate(zip(before, after, strict=False))
    # the first group that differs is the removed unit's
    i = next((i for i, (x, y) in pairs if not torch.equal(x, y)), len(after))
    return torch.equal(before[i], removed) and all(
        torch.equal(x, y) for x, y in zip(before[i + 1:], after[i:], strict=True))


@pytest.mark.parametrize("unit", UNITS)
def test_removing_one_unit_changes_only_its_blocks(unit, byte_tok, make_text):
    checked, tokenizer = 0, _MemoTokenizer(byte_tok)
    for seed in SEEDS:
        rng = random.Random(seed)
        salt = f"salt-{seed}"
        units = group_units(_corpus(seed, make_text), unit)
        assert len(units) >= 30
        for keys in (list(units), list(units)[1:]):  # no fallback in either neighbour
            flags = heldout_by_hash(FRACTION, salt)(keys)
            assert flags == [is_heldout(k, FRACTION, salt) for k in keys]
        removals = rng.sample(list(units), REMOVALS)
        for block_size in BLOCK_SIZES:
            for share in SHARES:
                def build(texts: dict[str, list[str]], share=share, block_size=block_size,
                          salt=salt):
                    blocks = blocks_of_units(
                        texts, tokenizer, block_size=block_size, unit=unit,
                        heldout_rule=heldout_by_hash(FRACTION, salt),
                        keep_rule=kept_by_hash(share, salt))
                    return (_groups(blocks.train, blocks.train_units),
                            _groups(blocks.heldout, blocks.heldout_units))

                full_train, full_heldout = build(units)
                for key in removals:
                    alone = pack_units([units[key]], tokenizer, block_size, "one unit")[0]
                    train, heldout = build({k: v for k, v in units.items() if k != key})
                    where = f"{unit}, block {block_size}, share {share}, seed {seed}"
                    assert _only_removed(full_train, train, alone), f"train side: {where}"
                    assert _only_removed(full_heldout, heldout, alone), f"held out: {where}"
                    checked += 1
    assert checked == len(SEEDS) * len(BLOCK_SIZES) * len(SHARES) * REMOVALS
