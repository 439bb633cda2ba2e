"""docs/architecture.md stays true: every `file.py:function` it cites exists, every path it
names is in the package, and its round table traces one round in at most six files."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
REFERENCE = re.compile(r"`([\w/]+\.py):([\w.]+)`")
PATH = re.compile(r"`([\w/]+(?:\.py|/))[`:]")


def _resolve(path: str, name: str) -> object:
    """``name`` (``Class.method`` allowed) in the package module at ``path``."""
    obj = importlib.import_module("fedcpt." + path.removesuffix(".py").replace("/", "."))
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _round_table() -> list[tuple[str, list[str]]]:
    """(file, function names) of each row of the "One round" table."""
    section = DOC.split("## One round", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((cells[1].strip("`"), re.findall(r"`([\w.]+)`", cells[2])))
    return rows


@pytest.mark.parametrize("path, name", sorted(set(REFERENCE.findall(DOC))))
def test_cited_function_exists(path, name):
    assert _resolve(path, name) is not None


def test_the_doc_cites_its_code_by_file_and_name():
    assert len(set(REFERENCE.findall(DOC))) >= 20


def test_every_cited_path_is_in_the_package():
    paths = set(PATH.findall(DOC))
    assert paths, "no paths found: has the citation style changed?"
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []


def test_one_round_is_traced_in_at_most_six_files_by_their_functions():
    rows = _round_table()
    files = {path for path, _ in rows}
    assert 3 <= len(files) <= 6, files
    for path, names in rows:
        assert names, f"row for {path} names no function"
        for name in names:
            assert _resolve(path, name) is not None, f"{path}:{name}"
