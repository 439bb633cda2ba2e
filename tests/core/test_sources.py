"""Built-in general sources: each is there offline after fedcpt's own install, is
deterministic, and is text of the register it claims."""

from __future__ import annotations

import re

import pytest

from fedcpt.core.builtin_sources import BUILTIN_SOURCES, builtin_texts, is_builtin
from fedcpt.core.data import read_texts
from fedcpt.exceptions import DataError

# what each register's text must look like, in most of its texts
SIGNS = {
    "stdlib:topics": r"\bthe\b",
    "stdlib:code": r"^\s*(def|class|import) ",
    "licenses:packages": r"(?i)\b(licen[cs]e|warrant|permission)",
    "numpy:c-headers": r"^#\s*(include|define|ifndef)",
    "chatterbot:english": r"\?\n",
    "torch:c10": r"^#(include|pragma)|namespace c10",
    "torch:aten-core": r"^#(include|pragma)|namespace",
    "gcide:entries": r"\A[^\n]+\n(n|v|a|adv|prep|conj|interj|pron|prop\. n|p\. p|pl)\.",
}


@pytest.mark.parametrize("name", sorted(BUILTIN_SOURCES))
def test_builtin_source_is_deterministic_text_of_its_register(name):
    texts = read_texts(name)  # by name, through the data pipeline
    assert BUILTIN_SOURCES[name].read() == texts  # read again from the install: the same
    total = sum(len(t) for t in texts)
    limit = BUILTIN_SOURCES[name].limit
    assert 20_000 < total < (limit or total + 1) + max(len(t) for t in texts)
    sign = re.compile(SIGNS[name], re.MULTILINE)
    assert sum(1 for t in texts if sign.search(t)) >= 0.5 * len(texts)


def test_licenses_are_each_distinct_once():
    texts = builtin_texts("licenses:packages")
    normalised = [" ".join(t.split()) for t in texts]
    assert len(set(normalised)) == len(normalised)


def test_unknown_builtin_source_names_the_known_ones():
    assert is_builtin("licenses:other") and not is_builtin("data/licenses.txt")
    with pytest.raises(DataError, match=r"unknown licenses source 'other'.*licenses:packages"):
        read_texts("licenses:other")


def test_gcide_has_a_hundred_thousand_entries_each_a_headword_and_its_senses():
    texts = builtin_texts("gcide:entries")
    assert BUILTIN_SOURCES["gcide:entries"].limit is None  # read whole: its size is the point
    assert len(texts) > 100_000
    assert len({t.split("\n", 1)[0] for t in texts}) > 100_000  # one text per headword
    monosperm = next(t for t in texts if t.startswith("monosperm\n"))
    assert monosperm.endswith("\nA monospermous plant.")
