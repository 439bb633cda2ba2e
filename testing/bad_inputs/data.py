"""Bad site data: files fedcpt cannot read as text, or too little text to train and hold
out, each fed to :func:`fedcpt.core.data.build_blocks` as a site's sources."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedcpt.core.data import build_blocks
from fedcpt.core.model import byte_tokenizer
from fedcpt.testing.bad_inputs.judge import BadInput

PROSE = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, again "
                    f"and again, for the {i}th time today." for i in range(200))


def _blocks(*sources: str | Path, text_field: str = "text") -> object:
    """Build a test site's blocks from ``sources``; their count if fedcpt accepted them."""
    blocks = build_blocks([str(s) for s in sources], byte_tokenizer(), block_size=16,
                          heldout_fraction=0.1, text_field=text_field, what="site 'test'",
                          unit="passage")
    return f"{len(blocks.train)} train blocks"


def _file(name: str, content: bytes | str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        path = folder / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return _blocks(path)
    return attempt


def _parquet(folder: Path) -> object:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"] * 10}), folder / "notes.parquet")
    return _blocks(folder / "notes.parquet")


def _copies(folder: Path) -> object:
    """Three files holding the same note: one document once duplicates are dropped."""
    for i in range(3):
        (folder / f"copy-{i}.txt").write_text(PROSE[:1500], encoding="utf-8")
    return _blocks(*(folder / f"copy-{i}.txt" for i in range(3)))


def _empty_dir(folder: Path) -> object:
    (folder / "notes").mkdir()
    (folder / "notes" / "scan.pdf").write_bytes(b"%PDF-1.4")
    return _blocks(folder / "notes")


DATA = [
    BadInput("data-non-utf8", "data", _file("notes.txt", "café".encode("latin-1") * 50),
             r"not UTF-8 text"),
    BadInput("data-empty-file", "data", _file("notes.txt", b""), r"contains no text"),
    BadInput("data-whitespace-only", "data", _file("notes.txt", " \n\n\t\n "),
             r"contains no text"),
    BadInput("data-binary", "data", _file("notes.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
             r"not UTF-8 text"),
    BadInput("data-huge-line", "data", _file("notes.txt", "word " * 200_000),
             r"single unit cannot be both trained on and held out"),
    BadInput("data-too-short", "data", _file("notes.txt", "Hello.\n\nBye."),
             r"too little text for one training and one held-out block"),
    BadInput("data-all-duplicates", "data", _copies, r"2 duplicate documents were dropped"),
    BadInput("data-jsonl-missing-field", "data",
             _file("notes.jsonl", '{"body": "a note"}\n'), r"notes.jsonl:1 has no string field"),
    BadInput("data-jsonl-bad-json", "data",
             _file("notes.jsonl", '{"text": "a note"}\n{"text": "cut off\n'),
             r"notes.jsonl:2 is not valid JSON"),
    BadInput("data-jsonl-not-object", "data", _file("notes.jsonl", "[1, 2, 3]\n"),
             r"notes.jsonl:1 has no string field 'text'"),
    BadInput("data-jsonl-text-not-string", "data", _file("notes.jsonl", '{"text": 42}\n'),
             r"notes.jsonl:1 has no string field 'text'"),
    BadInput("data-jsonl-empty-texts", "data", _file("notes.jsonl", '{"text": ""}\n' * 5),
             r"contains no text"),
    BadInput("data-missing-path", "data", lambda f: _blocks(f / "nowhere.txt"),
             r"data path not found"),
    BadInput("data-unsupported-extension", "data", _file("notes.pdf", b"%PDF-1.4 ..."),
             r"unsupported data file type '\.pdf'"),
    BadInput("data-dir-without-text-files", "data", _empty_dir, r"holds no .*txt"),
    BadInput("data-glob-matches-nothing", "data", lambda f: _blocks(f / "*.jsonl"),
             r"matches no"),
    BadInput("data-parquet-missing-column", "data", _parquet,
             r"cannot read text column 'text'"),
    BadInput("data-parquet-corrupt", "data", _file("notes.parquet", b"PAR1 not really"),
             r"cannot read text column"),
    BadInput("data-unknown-stdlib-source", "data", lambda f: _blocks("stdlib:poems"),
             r"unknown stdlib source 'poems'"),
]
