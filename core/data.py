"""Text sources → privacy units → deterministic train/held-out split → packed token blocks.

A *privacy unit* is what a site's DP guarantee protects: a person or a document, named by
the site's policy (:data:`UNIT_KINDS`). Blocks never span two units: each unit's texts are
cut into documents (paragraph groups of at most ~2,000 characters), tokenised and packed
on their own, so removing one unit changes only that unit's blocks. Whether a unit is held
out depends only on a salted hash of its key: the same on every run for a given salt, and a
unit never moves between train and held-out when other units are added or removed. A cap on
the trained set (the site's ``train_share``) is decided the same way, unit by unit, from a
second salted hash (:func:`kept_by_hash`): it never cuts the data in order, so no unit's
presence decides whether another is trained.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedcpt.config import DataConfig

# expand_source and read_texts are re-exported: callers read sources through this module
from fedcpt.core.sources import (  # noqa: F401
    Record,
    expand_source,
    read_records,
    read_texts,
)
from fedcpt.exceptions import DataError

log = logging.getLogger(__name__)

DOCUMENT_CHARS = 2000
# document: one text as read (a text file, a JSONL line, a parquet row); passage: one
# ~2,000-character paragraph group (for public corpora with no person behind a text);
# file / directory: everything in one file / one folder; field:NAME: every record whose
# JSONL or parquet field NAME has the same value (user_id, patient_id, ...).
UNIT_KINDS = ("document", "passage", "file", "directory", "field")
# A rule that flags unit keys: held out (heldout_by_hash) or kept under a cap (kept_by_hash).
UnitRule = Callable[[Sequence[str]], list[bool]]
HeldoutRule = UnitRule
CAP_DOMAIN = "train-share\x00"  # separates the cap's hash from the held-out split's


@dataclass(frozen=True)
class TokenBlocks:
    """Packed ``(N, block_size)`` int64 token blocks for training and held-out evaluation,
    with the index of the privacy unit each block belongs to (``train_units[i]`` for
    ``train[i]``; train units are numbered 0 … ``units`` − 1, held-out ones separately)."""

    train: torch.Tensor
    heldout: torch.Tensor
    documents: int
    heldout_documents: int
    train_units: torch.Tensor
    heldout_units: torch.Tensor
    unit: str = "document"

    @property
    def units(self) -> int:
        """Training units: the N of the site's unit-level guarantee."""
        return int(self.train_units.max()) + 1 if len(self.train_units) else 0

    @property
    def heldout_unit_count(self) -> int:
        return int(self.heldout_units.max()) + 1 if len(self.heldout_units) else 0


def parse_unit(unit: str) -> tuple[str, str]:
    """``(kind, field)`` of a unit spec such as ``document`` or ``field:patient_id``."""
    kind, _, name = unit.partition(":")
    if kind not in UNIT_KINDS or (kind == "field") != bool(name.strip()):
        raise DataError(f"privacy unit {unit!r} is not one of {list(UNIT_KINDS[:-1])} or "
                        "'field:<name>' (e.g. field:user_id)")
    return kind, name.strip()


def split_documents(texts: list[str], max_chars: int = DOCUMENT_CHARS) -> list[str]:
    """Cut texts at blank lines into documents of at most ~``max_chars`` characters."""
    documents: list[str] = []
    for text in texts:
        current: list[str] = []
        size = 0
        for para in re.split(r"\n\s*\n", text):
            if not para.strip():
                continue
            if current and size + len(para) > max_chars:
                documents.append("\n\n".join(current))
                current, size = [], 0
            current.append(para)
            size += len(para) + 2
        if current:
            documents.append("\n\n".join(current))
    return documents


def deduplicate(documents: list[str], what: str = "data") -> list[str]:
    """Drop exact duplicate documents (first kept), logging how many there were: repeated
    text (boilerplate headers, copied notes) would otherwise be over-weighted."""
    seen: set[bytes] = set()
    unique = []
    for doc in documents:
        digest = hashlib.sha256(doc.encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            unique.append(doc)
    if len(unique) < len(documents):
        log.info("%s: dropped %d duplicate documents of %d", what,
                 len(documents) - len(unique), len(documents))
    return unique


def group_units(records: list[Record], unit: str) -> dict[str, list[str]]:
    """Texts by unit key, in order of first appearance. Keys name the unit (a path, a
    field value, a text's SHA-256); they stay at the site (only salted digests are kept)."""
    kind, name = parse_unit(unit)
    units: dict[str, list[str]] = {}
    for record in records:
        if kind == "passage":
            for piece in split_documents([record.text]):
                units.setdefault("passage:" + _sha(piece), []).append(piece)
            continue
        if kind in ("file", "directory") and not record.path:
            raise DataError(f"privacy unit {unit!r} needs local files; generated or hub "
                            "sources have none (use 'document' or 'passage')")
        key = {"document": lambda r: "document:" + _sha(r.text),
               "file": lambda r: "file:" + r.path,
               "directory": lambda r: "directory:" + str(Path(r.path).parent),
               "field": lambda r: f"field:{name}={r.field_value}"}[kind](record)
        units.setdefault(key, []).append(record.text)
    return units


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unit_digest(key: str, salt: str = "") -> bytes:
    """The salted SHA-256 of a unit key: decides its side, and is all a record keeps."""
    return hashlib.sha256((salt + "\x00" + key if salt else key).encode("utf-8")).digest()


def is_heldout(key: str, fraction: float, salt: str = "") -> bool:
    """Deterministic membership of the held-out split, from the unit key's salted SHA-256.
    Without the salt, nobody can tell (or steer) which units are held out."""
    return int.from_bytes(unit_digest(key, salt)[:8], "big") / 2**64 < fraction


def kept_by_hash(share: float, salt: str = "") -> UnitRule:
    """The cap on a site's trained set: a unit is kept iff its salted, domain-separated hash
    falls below ``share``. Each unit is decided on its own (unlike a token budget filled in
    order, where removing one unit lets another in), and without the salt nobody can tell
    or steer which units are kept."""
    if not 0 < share <= 1:
        raise ValueError(f"train share {share!r} must be in (0, 1]")  # a bug: policy checks it

    def rule(keys: Sequence[str]) -> list[bool]:
        return [share >= 1 or
                int.from_bytes(unit_digest(CAP_DOMAIN + k, salt)[:8], "big") / 2**64 < share
                for k in keys]
    return rule


def heldout_by_hash(fraction: float, salt: str = "") -> HeldoutRule:
    """:func:`is_heldout` for every key; a small corpus whose hashes put no unit on one
    side gives that side the unit closest to the threshold, so both are non-empty
    whenever there are two units."""
    def rule(keys: Sequence[str]) -> list[bool]:
        flags = [is_heldout(k, fraction, salt) for k in keys]
        if len(keys) >= 2 and (all(flags) or not any(flags)):
            ranked = sorted(range(len(keys)), key=lambda i: unit_digest(keys[i], salt))
            pick = ranked[0] if not any(flags) else ranked[-1]
            flags[pick] = not flags[pick]
            log.warning("the salted hash put all %d units on one side of the held-out split; "
                        "one unit was moved so both sides have one (a first split of a "
                        "tiny corpus: its neighbours may move another unit)", len(keys))
        return flags
    return rule


def pack(token_lists: list[list[int]], eos_id: int, block_size: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into full ``block_size`` blocks."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks,
                                                                                  block_size)


def pack_units(units: list[list[str]], tokenizer: PreTrainedTokenizerBase, block_size: int,
               what: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Pack each unit's documents on its own: ``(blocks, unit index per block, documents,
    duplicates dropped)``. Duplicates are dropped within a unit only (across units, dropping
    one unit's copy would make another unit's blocks depend on it). A unit with fewer than
    ``block_size`` tokens gives no block (and is not counted)."""
    blocks, owners, documents, duplicates = [], [], 0, 0
    for texts in units:
        pieces = split_documents(texts)
        docs = deduplicate(pieces, what)
        documents += len(docs)
        duplicates += len(pieces) - len(docs)
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
        packed = pack(ids, tokenizer.eos_token_id, block_size)
        if len(packed):
            owners.append(torch.full((len(packed),), len(blocks), dtype=torch.long))
            blocks.append(packed)
    if not blocks:
        return (torch.empty(0, block_size, dtype=torch.long),
                torch.empty(0, dtype=torch.long), documents, duplicates)
    return torch.cat(blocks), torch.cat(owners), documents, duplicates


def build_blocks(
    sources: tuple[str, ...] | list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    heldout_fraction: float,
    text_field: str = "text",
    what: str = "data",
    unit: str = "document",
    heldout_rule: HeldoutRule | None = None,
    keep_rule: UnitRule | None = None,
) -> TokenBlocks:
    """Read ``sources``, group them into privacy units, split the units into train and
    held-out (by ``heldout_rule``, else an unsalted hash at ``heldout_fraction``), keep the
    training units ``keep_rule`` keeps (a cap, :func:`kept_by_hash`; all without one) and
    pack each unit on its own; raises DataError when nothing is left."""
    _, field = parse_unit(unit)
    records: list[Record] = []
    for spec in sources:
        found = read_records(spec, text_field, field)
        if not any(r.text.strip() for r in found):
            raise DataError(f"{what}: source {spec!r} contains no text")
        records.extend(found)
    return blocks_of_units(group_units(records, unit), tokenizer, block_size=block_size,
                           heldout_rule=heldout_rule or heldout_by_hash(heldout_fraction),
                           keep_rule=keep_rule, what=what, unit=unit)


def blocks_of_units(units: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, *,
                    block_size: int, heldout_rule: HeldoutRule,
                    keep_rule: UnitRule | None = None, what: str = "data",
                    unit: str = "document") -> TokenBlocks:
    """The train / held-out blocks of ``units`` (texts by unit key, from
    :func:`group_units`): each unit's side and whether a cap keeps it are decided from its
    key alone, and it is packed alone, so removing one unit changes only its blocks."""
    kind, _ = parse_unit(unit)
    keys = list(units)
    flags = heldout_rule(keys)
    train_keys = [k for k, f in zip(keys, flags, strict=True) if not f]
    if keep_rule is not None:
        kept = keep_rule(train_keys)
        train_keys = [k for k, keep in zip(train_keys, kept, strict=True) if keep]
    train, train_units, n_train_docs, dup_train = pack_units(
        [units[k] for k in train_keys], tokenizer, block_size, what)
    heldout, heldout_units, n_heldout_docs, dup_heldout = pack_units(
        [units[k] for k, f in zip(keys, flags, strict=True) if f], tokenizer, block_size, what)
    if len(train) == 0 or len(heldout) == 0:
        raise DataError(
            f"{what}: too little text for one training and one held-out block of "
            f"{block_size} tokens ({len(keys)} privacy units of kind {kind!r}, "
            f"{len(train)} train blocks, {len(heldout)} held-out blocks)"
            + (f"; {dup_train + dup_heldout} duplicate documents were dropped"
               if dup_train + dup_heldout else "")
            + ("; a single unit cannot be both trained on and held out: choose a finer "
               "privacy unit or add data" if len(keys) < 2 else ""))
    result = TokenBlocks(train, heldout, n_train_docs + n_heldout_docs, n_heldout_docs,
                         train_units, heldout_units, unit)
    log.debug("%s: %d units -> %d train blocks (%d units) / %d held-out blocks (%d units)",
              what, len(keys), len(train), result.units, len(heldout),
              result.heldout_unit_count)
    return result


def load_blocks(sources: tuple[str, ...], tokenizer: PreTrainedTokenizerBase,
                data: DataConfig, *, what: str, unit: str = "passage",
                heldout_rule: HeldoutRule | None = None, keep_rule: UnitRule | None = None,
                ) -> TokenBlocks:
    """:func:`build_blocks` with a run's data settings. ``unit`` defaults to passages: the
    server's public general data has no person behind it; a site passes its policy's unit,
    held-out rule and cap (and has checked ``data`` against its policy first)."""
    return build_blocks(
        sources, tokenizer, block_size=data.block_size, heldout_fraction=data.heldout_fraction,
        text_field=data.text_field, what=what, unit=unit, heldout_rule=heldout_rule,
        keep_rule=keep_rule)


def spread(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` blocks evenly spaced through ``blocks`` (all of them if there are fewer)."""
    if len(blocks) <= n:
        return blocks
    idx = torch.linspace(0, len(blocks) - 1, n).round().long()
    return blocks[idx]


def blocks_across_units(blocks: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` blocks taken round-robin over the units (the first block of every unit, then
    the second, …): a query of ``n`` blocks covers min(``n``, units) units, so a minimum
    counted in units holds whatever the units' lengths."""
    if len(owners) == 0:
        return blocks[:0]
    first = torch.ones(len(owners), dtype=torch.bool)
    first[1:] = owners[1:] != owners[:-1]
    starts = torch.nonzero(first).flatten()
    rank = torch.arange(len(owners)) - starts[torch.cumsum(first.long(), 0) - 1]
    # ordered by (rank, owner, position): two stable sorts, the minor key first (a Python
    # sort keyed on tensor items took seconds per query in a busy Ray worker)
    by_owner = torch.sort(owners, stable=True).indices
    order = by_owner[torch.sort(rank[by_owner], stable=True).indices]
    return blocks[order[:n]]


def first_block_per_unit(blocks: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """One block (its first) from each of the first ``n`` units: a query over ``n`` units
    in which each unit weighs the same."""
    first = torch.ones(len(owners), dtype=torch.bool)
    first[1:] = owners[1:] != owners[:-1]
    return blocks[first][:n]
