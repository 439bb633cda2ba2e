"""Text sources -> privacy units -> deterministic held-out split -> blocks packed per unit."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedcpt.core.data import (
    blocks_across_units,
    build_blocks,
    expand_source,
    heldout_by_hash,
    is_heldout,
    kept_by_hash,
    pack,
    read_texts,
    split_documents,
    spread,
)
from fedcpt.exceptions import DataError


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()

BLOCK = 64


def _blocks(sources, tok, **kwargs):
    kwargs.setdefault("block_size", BLOCK)
    kwargs.setdefault("heldout_fraction", 0.5)
    kwargs.setdefault("unit", "passage")
    return build_blocks([str(s) for s in sources], tok, **kwargs)


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


# --- split_documents -------------------------------------------------------------------

def test_split_documents_caps_size_at_paragraph_boundaries():
    paras = [f"paragraph {i} " + "x" * 480 for i in range(12)]
    docs = split_documents(["\n\n".join(paras)], max_chars=2000)
    assert len(docs) > 1
    assert all(len(d) <= 2000 for d in docs)
    # no paragraph is cut or lost, and order is kept
    assert [p for d in docs for p in d.split("\n\n")] == paras


def test_split_documents_keeps_an_oversized_paragraph_whole():
    long = "y" * 5000
    docs = split_documents([f"short one\n\n{long}\n\nshort two"], max_chars=2000)
    assert long in docs
    assert docs == ["short one", long, "short two"]


def test_split_documents_never_joins_separate_texts():
    assert split_documents(["first text", "second text"]) == ["first text", "second text"]


def test_split_documents_drops_blank_paragraphs_and_whitespace_separators():
    docs = split_documents(["a\n\n\n\n   \n\nb\n  \t\nc", "   \n\n  "], max_chars=2000)
    assert docs == ["a\n\nb\n\nc"]


# --- is_heldout ------------------------------------------------------------------------

def test_is_heldout_is_deterministic():
    docs = [f"document number {i}" for i in range(200)]
    first = [is_heldout(d, 0.3) for d in docs]
    assert first == [is_heldout(d, 0.3) for d in docs]
    assert any(first) and not all(first)


def test_heldout_share_is_close_to_fraction():
    docs = [f"document {i}: some words about item {i * 7}" for i in range(5000)]
    share = sum(is_heldout(d, 0.1) for d in docs) / len(docs)
    assert share == pytest.approx(0.1, abs=0.015)


def test_heldout_split_is_nested_as_fraction_grows():
    docs = [f"doc {i}" for i in range(1000)]
    small = {d for d in docs if is_heldout(d, 0.1)}
    large = {d for d in docs if is_heldout(d, 0.3)}
    assert small < large


# --- pack ------------------------------------------------------------------------------

def test_pack_inserts_eos_between_documents_and_drops_tail():
    blocks = pack([[1, 2, 3], [4, 5], [6]], eos_id=0, block_size=3)
    # stream: 1 2 3 0 4 5 0 6 0 -> three full blocks, nothing left over
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert blocks.dtype == torch.long
    blocks = pack([[1, 2, 3], [4, 5]], eos_id=9, block_size=4)
    # stream: 1 2 3 9 4 5 9 -> one block; the partial tail "4 5 9" is dropped
    assert blocks.tolist() == [[1, 2, 3, 9]]


def test_pack_too_short_gives_no_blocks():
    blocks = pack([[1, 2]], eos_id=0, block_size=8)
    assert blocks.shape == (0, 8)


# --- build_blocks on every supported source type ---------------------------------------

def test_build_blocks_txt_packs_each_passage_on_its_own(write_text, byte_tok):
    path = write_text("site.txt", 20_000, seed=1)
    result = _blocks([path], byte_tok)
    text = path.read_text(encoding="utf-8")
    docs = split_documents([text])
    train_docs = [d for d in docs if not is_heldout("passage:" + _sha(d), 0.5)]
    held_docs = [d for d in docs if is_heldout("passage:" + _sha(d), 0.5)]
    assert result.documents == len(docs)
    assert result.heldout_documents == len(held_docs)
    assert result.train.shape[1] == result.heldout.shape[1] == BLOCK
    assert result.train.dtype == result.heldout.dtype == torch.long
    eos = byte_tok.eos_token_id
    expected, owners = [], []
    for d in train_docs:  # each unit packed alone: its tail is dropped, never joined
        ids = byte_tok(d, add_special_tokens=False)["input_ids"] + [eos]
        n = len(ids) // BLOCK
        if n:
            expected += ids[: n * BLOCK]
            owners += [len(set(owners))] * n
    assert result.train.flatten().tolist() == expected
    assert result.train_units.tolist() == owners
    assert result.units == len(set(owners))
    held_bytes = "\x00".join(held_docs)
    first = byte_tok.decode([t for t in result.heldout[0].tolist() if t != eos])
    assert first[:40] in held_bytes


def test_build_blocks_is_reproducible(write_text, byte_tok):
    path = write_text("site.txt", 20_000, seed=2)
    a, b = _blocks([path], byte_tok), _blocks([path], byte_tok)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)


def test_build_blocks_cap_keeps_whole_units_by_salted_hash(write_text, byte_tok):
    path = write_text("site.txt", 40_000, seed=3)
    rule = heldout_by_hash(0.2, salt="s")
    full = _blocks([path], byte_tok, heldout_rule=rule)
    capped = _blocks([path], byte_tok, heldout_rule=rule, keep_rule=kept_by_hash(0.5, "s"))
    assert 0 < capped.units < full.units
    full_units = {tuple(map(tuple, b.tolist())) for b in _groups(full.train, full.train_units)}
    for unit in _groups(capped.train, capped.train_units):  # whole units, never a cut one
        assert tuple(map(tuple, unit.tolist())) in full_units
    assert torch.equal(capped.heldout, full.heldout)  # the cap is for training only
    other_salt = _blocks([path], byte_tok, heldout_rule=rule, keep_rule=kept_by_hash(0.5, "t"))
    assert not torch.equal(other_salt.train, capped.train)  # the salt decides which


def test_kept_by_hash_is_per_unit_and_nested():
    keys = [f"passage:{i}" for i in range(4000)]
    half, tenth = kept_by_hash(0.5, "salt")(keys), kept_by_hash(0.1, "salt")(keys)
    assert sum(half) / len(keys) == pytest.approx(0.5, abs=0.03)
    assert all(h for h, t in zip(half, tenth, strict=True) if t)  # a smaller cap, a subset
    assert kept_by_hash(0.5, "salt")(keys[::-1]) == half[::-1]  # order plays no part
    assert all(kept_by_hash(1.0, "salt")(keys))
    # a separate hash from the held-out split: the kept units are not the held-out ones
    held = heldout_by_hash(0.5, "salt")(keys)
    assert 0.4 < sum(h and k for h, k in zip(held, half, strict=True)) / sum(held) < 0.6


def _groups(blocks: torch.Tensor, owners: torch.Tensor) -> list[torch.Tensor]:
    return [blocks[owners == i] for i in range(int(owners.max()) + 1)] if len(owners) else []


def test_build_blocks_markdown(write_text, byte_tok):
    path = write_text("notes.md", 20_000, seed=4)
    result = _blocks([path], byte_tok)
    assert len(result.train) > 0 and len(result.heldout) > 0
    same_as_txt = write_text("notes.txt", 20_000, seed=4)
    assert torch.equal(result.train, _blocks([same_as_txt], byte_tok).train)


def test_build_blocks_jsonl_with_text_field(tmp_path, byte_tok, make_text):
    texts = [make_text(1500, seed=i) for i in range(20)]
    path = tmp_path / "records.jsonl"
    lines = [json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n",
                    encoding="utf-8")
    assert read_texts(str(path), text_field="body") == texts
    result = _blocks([path], byte_tok, text_field="body")
    assert result.documents == len(split_documents(texts))
    assert len(result.train) > 0 and len(result.heldout) > 0


def test_build_blocks_parquet(tmp_path, byte_tok, make_text):
    texts = [make_text(1500, seed=i) for i in range(20)]
    path = tmp_path / "records.parquet"
    pq.write_table(pa.table({"content": texts, "n": list(range(20))}), path)
    assert read_texts(str(path), text_field="content") == texts
    result = _blocks([path], byte_tok, text_field="content")
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": t}) for t in texts), encoding="utf-8")
    assert torch.equal(result.train, _blocks([jsonl], byte_tok, text_field="content").train)


def test_build_blocks_directory_recurses_and_skips_other_types(write_text, tmp_path, byte_tok):
    write_text("corpus/a.txt", 8000, seed=5)
    write_text("corpus/sub/b.md", 8000, seed=6)
    (tmp_path / "corpus" / "manual.pdf").write_bytes(b"%PDF-1.4 not text")
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG")
    files = expand_source(str(tmp_path / "corpus"))
    assert [p.name for p in files] == ["a.txt", "b.md"]
    result = _blocks([tmp_path / "corpus"], byte_tok)
    both = _blocks([tmp_path / "corpus" / "a.txt", tmp_path / "corpus" / "sub" / "b.md"],
                   byte_tok)
    assert torch.equal(result.train, both.train)
    assert torch.equal(result.heldout, both.heldout)


def test_build_blocks_glob(write_text, tmp_path, byte_tok):
    write_text("g/one.txt", 8000, seed=7)
    write_text("g/two.txt", 8000, seed=8)
    write_text("g/skip.md", 8000, seed=9)
    assert [p.name for p in expand_source(str(tmp_path / "g" / "*.txt"))] == ["one.txt",
                                                                              "two.txt"]
    result = _blocks([tmp_path / "g" / "*.txt"], byte_tok)
    explicit = _blocks([tmp_path / "g" / "one.txt", tmp_path / "g" / "two.txt"], byte_tok)
    assert torch.equal(result.train, explicit.train)


def test_uppercase_suffix_accepted(write_text, byte_tok):
    path = write_text("LOUD.TXT", 20_000, seed=10)
    assert len(_blocks([path], byte_tok).train) > 0


# --- errors, each a DataError with a clear message --------------------------------------

def test_missing_path(tmp_path, byte_tok):
    with pytest.raises(DataError, match=r"data path not found: .*missing\.txt"):
        _blocks([tmp_path / "missing.txt"], byte_tok)


def test_unsupported_suffix(tmp_path, byte_tok):
    path = tmp_path / "paper.pdf"
    path.write_bytes(b"%PDF-1.4")
    with pytest.raises(DataError,
                       match=r"unsupported data file type '\.pdf' for .*paper\.pdf; "
                             r"supported: \.txt, \.md"):
        _blocks([path], byte_tok)


def test_empty_file(tmp_path, byte_tok):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"source '.*empty\.txt' contains no text"):
        _blocks([path], byte_tok)


def test_whitespace_only_file(tmp_path, byte_tok):
    path = tmp_path / "blank.md"
    path.write_text("\n\n   \n\t\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"site 'x': source '.*blank\.md' contains no text"):
        _blocks([path], byte_tok, what="site 'x'")


def test_non_utf8_file(tmp_path, byte_tok):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café au lait, crème brûlée. ".encode("latin-1") * 200)
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(.* at byte 3\)"):
        _blocks([path], byte_tok)


def test_jsonl_line_missing_text_field(tmp_path, byte_tok):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "wrong field"}\n', encoding="utf-8")
    with pytest.raises(DataError,
                       match=r"rows\.jsonl:2 has no string field 'text' \(set data\.text_field\)"):
        _blocks([path], byte_tok)


def test_jsonl_non_string_text_field(tmp_path, byte_tok):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl:1 has no string field 'text'"):
        _blocks([path], byte_tok)


def test_jsonl_invalid_json(tmp_path, byte_tok):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl:3 is not valid JSON: Expecting value"):
        _blocks([path], byte_tok)


def test_parquet_missing_column(tmp_path, byte_tok):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": ["some text"]}), path)
    with pytest.raises(DataError, match=r"rows\.parquet: cannot read text column 'text'"):
        _blocks([path], byte_tok)


def test_too_little_text_for_one_block(tmp_path, byte_tok):
    path = tmp_path / "short.txt"
    path.write_text("Only a sentence or two.\n\nNot nearly enough for a block.",
                    encoding="utf-8")
    with pytest.raises(DataError,
                       match=r"site 'tiny': too little text for one training and one held-out "
                             r"block of 64 tokens \(1 privacy units of kind 'passage', "
                             r"0 train blocks"):
        _blocks([path], byte_tok, what="site 'tiny'")


def test_glob_matching_nothing(tmp_path, byte_tok):
    with pytest.raises(DataError, match=r"data glob '.*\*\.txt' matches no"):
        _blocks([tmp_path / "*.txt"], byte_tok)


def test_directory_without_supported_files(tmp_path, byte_tok):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError, match=r"data directory .*docs holds no \.txt/\.md"):
        _blocks([tmp_path / "docs"], byte_tok)


def test_unknown_stdlib_source(byte_tok):
    with pytest.raises(DataError, match=r"unknown stdlib source 'poems'"):
        _blocks(["stdlib:poems"], byte_tok)


# --- spread ----------------------------------------------------------------------------

def test_spread_picks_evenly_including_ends():
    blocks = torch.arange(100).view(100, 1)
    picked = spread(blocks, 5).flatten().tolist()
    assert picked == [0, 25, 50, 74, 99]
    assert torch.equal(spread(blocks[:3], 5), blocks[:3])


def test_duplicate_documents_are_dropped(byte_tok, caplog):
    from fedcpt.core.data import deduplicate

    docs = ["alpha text", "beta text", "alpha text", "alpha text"]
    with caplog.at_level("INFO", logger="fedcpt.core.data"):
        assert deduplicate(docs, "site x") == ["alpha text", "beta text"]
    assert "dropped 2 duplicate documents of 4" in caplog.text


# --- privacy units ------------------------------------------------------------------------

def _records(tmp_path, make_text, users=12, per_user=3, name="notes.jsonl"):
    path = tmp_path / name
    lines = [json.dumps({"user_id": f"u{u}", "text": make_text(900, seed=u * 10 + i)})
             for i in range(per_user) for u in range(users)]  # a user's notes interleaved
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _by_unit(result, keys):
    """{unit key: that unit's train blocks as a list}."""
    return {k: result.train[result.train_units == i].tolist() for i, k in enumerate(keys)}


def test_removing_one_unit_changes_only_that_units_blocks(tmp_path, byte_tok, make_text):
    path = _records(tmp_path, make_text)
    order = [f"u{u}" for u in range(12)]
    train_users = [u for u in order if not is_heldout(f"field:user_id={u}", 0.25)]
    gone = train_users[1]
    full = _blocks([path], byte_tok, unit="field:user_id", heldout_fraction=0.25)
    without = tmp_path / "without.jsonl"
    without.write_text("\n".join(ln for ln in path.read_text().splitlines()
                                 if f'"{gone}"' not in ln), encoding="utf-8")
    less = _blocks([without], byte_tok, unit="field:user_id", heldout_fraction=0.25)
    before = _by_unit(full, train_users)  # train units are numbered in order of appearance
    after = _by_unit(less, [u for u in train_users if u != gone])
    assert before[gone]
    assert {u: b for u, b in before.items() if u != gone} == after
    assert torch.equal(full.heldout, less.heldout)
    assert less.units == full.units - 1


def test_blocks_never_span_two_units(tmp_path, byte_tok):
    # each user writes only their own word, so a block's words name its users
    path = tmp_path / "notes.jsonl"
    words = [f"user{chr(97 + u)}" for u in range(8)]
    lines = [json.dumps({"user_id": u, "text": " ".join([words[u]] * (40 + 7 * i))})
             for i in range(3) for u in range(8)]
    path.write_text("\n".join(lines), encoding="utf-8")
    result = _blocks([path], byte_tok, unit="field:user_id", heldout_fraction=0.3)
    users_of_unit = {}
    for block, owner in zip(result.train, result.train_units, strict=True):
        text = byte_tok.decode(block.tolist())
        present = {w for w in words if w in text}
        assert len(present) == 1, text  # every block is text of exactly one user ...
        users_of_unit.setdefault(int(owner), set()).update(present)
    assert all(len(users) == 1 for users in users_of_unit.values())  # ... its unit's
    assert len(users_of_unit) == result.units


def test_file_and_directory_units(tmp_path, write_text, byte_tok):
    for i in range(6):
        write_text(f"people/p{i}/a.txt", 3000, seed=i)
        write_text(f"people/p{i}/b.txt", 3000, seed=50 + i)
    files = _blocks([tmp_path / "people"], byte_tok, unit="file", heldout_fraction=0.3)
    folders = _blocks([tmp_path / "people"], byte_tok, unit="directory", heldout_fraction=0.3)
    assert files.units + files.heldout_unit_count == 12
    assert folders.units + folders.heldout_unit_count == 6


def test_a_salt_moves_the_split_and_nobody_can_predict_it():
    keys = [f"field:patient_id={i}" for i in range(400)]
    plain = [is_heldout(k, 0.2) for k in keys]
    salted = [is_heldout(k, 0.2, salt="site secret") for k in keys]
    assert plain != salted
    assert sum(salted) / len(keys) == pytest.approx(0.2, abs=0.06)


def test_bad_unit_specs_fail_cleanly(tmp_path, write_text, byte_tok, make_text):
    path = write_text("a.txt", 5000, seed=1)
    with pytest.raises(DataError, match="privacy unit 'person' is not one of"):
        _blocks([path], byte_tok, unit="person")
    with pytest.raises(DataError, match="plain text and has no field 'user_id'"):
        _blocks([path], byte_tok, unit="field:user_id")
    notes = _records(tmp_path, make_text, users=3, per_user=1)
    with pytest.raises(DataError, match="has no unit field 'patient_id'"):
        _blocks([notes], byte_tok, unit="field:patient_id")


@pytest.mark.parametrize("seed", range(5))
def test_blocks_across_units_takes_the_first_block_of_every_unit_then_the_second(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (40,), generator=gen)
    owners = torch.repeat_interleave(torch.randperm(40, generator=gen), lengths)
    if seed % 2:  # a unit may also come back after another (ranks count within each run)
        owners = torch.cat([owners, owners[:7]])
    blocks = torch.arange(len(owners)).unsqueeze(1).repeat(1, 3)
    first = torch.ones(len(owners), dtype=torch.bool)
    first[1:] = owners[1:] != owners[:-1]
    rank, seen = [], 0
    for i in range(len(owners)):
        seen = 0 if first[i] else seen + 1
        rank.append(seen)
    expected = sorted(range(len(owners)), key=lambda i: (rank[i], int(owners[i]), i))
    for n in (1, 8, 40, len(owners)):
        assert blocks_across_units(blocks, owners, n)[:, 0].tolist() == expected[:n]
    assert len(blocks_across_units(blocks, owners[:0], 8)) == 0
