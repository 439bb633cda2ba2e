"""A hostile server against a deployed site's real handlers, choosing the inputs that
select or shape the site's data and model: the text column, the model path, the block size,
the cap, and an evaluation query of the minimum size.

A refusal counts only if the site's own check fired (its reason, in the reply or in the
site's log), nothing was read or opened, and the site's ledger — written by one honest round
first — is byte for byte as it was.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fedcpt.client.app as client_app
import fedcpt.client.request as request
import fedcpt.client.site as client_site
import fedcpt.core.data as core_data
import fedcpt.privacy.release as release
from fedcpt.client.site import policy_for, resolve_site, site_blocks
from fedcpt.config import load_config
from fedcpt.core.model import load_adapted_model, load_tokenizer
from fedcpt.privacy import dpsgd
from fedcpt.testing.site_round import site_context, task_identity, train_message

USERS = 40


@dataclass
class Site:
    folder: Path
    data: Path

    @property
    def ledger(self) -> Path:
        return self.folder / "clinic.ledger.json"

    def context(self, **policy: str):
        return site_context(str(self.data), self.ledger, name="clinic", unit="field:user_id",
                            **{"heldout-fraction": "0.3", **policy})


def _notes(path: Path, users: range, long: tuple[int, ...] = ()) -> Path:
    """Each user's notes, one JSONL line each, with a `diagnosis` column the site never
    allowed; users in ``long`` write 20 times as much."""
    lines = []
    for u in users:
        repeat = 220 if u in long else 11
        text = " ".join(f"Note {i} of patient {u}: slept well, walked a little, asked about "
                        "lunch." for i in range(repeat))
        lines.append(json.dumps({"user_id": f"p{u}", "text": text,
                                 "diagnosis": f"patient {u} has condition {u % 7}"}))
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _send(site: Site, overrides: list[str], handler: str = "train", **policy: str):
    cfg = load_config("smoke-dp", overrides=overrides)
    initial = load_adapted_model(load_config("smoke-dp").model, cfg.lora,
                                 cfg.seed).initial_adapter
    with task_identity():
        return getattr(client_app, handler)(train_message(cfg, "hostile", 2, initial),
                                            site.context(**policy))


@pytest.fixture
def site(tmp_path) -> Site:
    """A deployed site that has run one honest DP round, so its ledger and split exist."""
    site = Site(tmp_path, _notes(tmp_path / "notes.jsonl", range(USERS)))
    reply = _send(site, [])
    assert not reply.has_error(), reply.error.reason
    return site


@pytest.fixture
def nothing_opened(monkeypatch):
    """Fail the test if the site reads any record or opens any model or tokenizer."""
    opened: list[str] = []

    def trap(what):
        def opened_anyway(*args, **kwargs):
            opened.append(what)
            raise AssertionError(f"the site {what} before refusing")
        return opened_anyway

    monkeypatch.setattr(core_data, "read_records", trap("read its data"))
    monkeypatch.setattr(request, "load_adapted_model", trap("opened a model"))
    monkeypatch.setattr(client_site, "load_tokenizer", trap("opened a tokenizer"))
    return opened


def _refused(site: Site, reply, reason: str, caplog) -> None:
    assert reply.has_error(), "the site answered the hostile request"
    logged = [r.getMessage() for r in caplog.records]
    assert any(reason in text for text in [reply.error.reason, *logged]), (
        f"not the site's own check: {reply.error.reason!r}")


def _attack(site: Site, caplog, overrides: list[str], reason: str, handler: str = "train",
            **policy: str) -> None:
    before = site.ledger.read_bytes(), (site.folder / "clinic.split.json").read_bytes()
    site_blocks.cache_clear()  # a fresh site process: nothing cached from the honest round
    with caplog.at_level(logging.WARNING):
        reply = _send(site, overrides, handler, **policy)
    _refused(site, reply, reason, caplog)
    after = site.ledger.read_bytes(), (site.folder / "clinic.split.json").read_bytes()
    assert after == before, "the ledger or the split record changed"


@pytest.mark.parametrize("handler", ["train", "evaluate"])
def test_the_server_cannot_choose_which_column_is_read(site, caplog, nothing_opened, handler):
    _attack(site, caplog, ["data.text_field=diagnosis"],
            "refuses `data.text_field` = 'diagnosis': not a text column its policy allows",
            handler)
    assert not nothing_opened


@pytest.mark.parametrize("handler", ["train", "evaluate"])
def test_the_server_cannot_open_a_model_path_nor_learn_which_exist(site, caplog, tmp_path,
                                                                   nothing_opened, handler):
    real = tmp_path / "models" / "clinic-private-llm"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    reasons = []
    for path in (real, tmp_path / "models" / "no-such-model"):
        _attack(site, caplog, [f"model.name={path}"],
                f"refuses `model.name` = '{path}': not a model its policy allows", handler)
        reasons.append(_send(site, [f"model.name={path}"], handler).error.reason
                       .replace(str(path), "<asked>"))
    assert reasons[0] == reasons[1]  # the same answer whether or not the path exists
    # the reply is the gate's generic sentence: it names neither the path nor what is allowed
    assert "site's own log" in reasons[0]
    assert "<asked>" not in reasons[0] and "tiny-llama" not in reasons[0]
    assert not nothing_opened


def test_the_server_cannot_choose_a_block_size_the_site_does_not_allow(site, caplog,
                                                                       nothing_opened):
    _attack(site, caplog, ["data.block_size=48"],
            "refuses `data.block_size` = 48: not a block size its policy allows")
    assert not nothing_opened


def test_the_server_cannot_loosen_the_sites_cap(site, caplog, nothing_opened):
    _attack(site, caplog, ["data.train_share=0.9"],
            "refuses `data.train_share` = 0.9: it would loosen the site's cap, a share of 0.5",
            **{"train-share": "0.5"})
    assert not nothing_opened


def test_a_model_the_site_lists_is_opened(site):
    reply = _send(site, ["model.name=tiny-llama"], **{"allowed-models": "tiny-llama"})
    assert not reply.has_error(), reply.error.reason


def test_the_servers_cap_removes_no_unit_but_the_removed_one(tmp_path, monkeypatch):
    """The attack of the in-order cap: the server caps the site, then compares what it
    trains with and without one unit. Through the real train handler, twice, with one
    salt: every trained unit but the removed one is trained, block for block, in both."""
    trained: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = dpsgd.train_adapter_dp

    def spy(lm, blocks, *args, units, **kwargs):
        trained.append((blocks.clone(), units.clone()))
        return real(lm, blocks, *args, units=units, **kwargs)

    monkeypatch.setattr("fedcpt.client.train_step.train_adapter_dp", spy)
    whole = Site(tmp_path / "whole", _notes(_dir(tmp_path / "whole") / "notes.jsonl",
                                            range(USERS), long=(3, 4, 5)))
    assert not _send(whole, ["data.train_share=0.6"]).has_error()
    tokenizer = load_tokenizer(load_config("smoke-dp").model)
    (a, a_units), = trained
    groups_a = [a[a_units == i] for i in range(int(a_units.max()) + 1)]
    users = [int(re.search(r"patient (\d+):", tokenizer.decode(g[0].tolist())).group(1))
             for g in groups_a]
    assert USERS * 0.7 * 0.3 < len(users) < USERS * 0.7 * 0.9  # the cap dropped units
    removed = max(users, key=lambda u: (u in (3, 4, 5), u))  # a trained, long one if any
    less = Site(tmp_path / "less", _notes(_dir(tmp_path / "less") / "notes.jsonl",
                                          [u for u in range(USERS) if u != removed],
                                          long=(3, 4, 5)))
    shutil.copy(whole.folder / "clinic.split.json", less.folder / "clinic.split.json")
    site_blocks.cache_clear()
    assert not _send(less, ["data.train_share=0.6"]).has_error()
    (b, b_units) = trained[1]
    groups_b = [b[b_units == i] for i in range(int(b_units.max()) + 1)]
    expected = [g for g, u in zip(groups_a, users, strict=True) if u != removed]
    assert len(groups_b) == len(expected) == len(groups_a) - 1
    assert all(torch.equal(x, y) for x, y in zip(groups_b, expected, strict=True))


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_a_minimum_query_covers_the_minimum_of_held_out_units(tmp_path, monkeypatch):
    """The server asks for a plain evaluation of the smallest size the site allows (8):
    it must cover 8 held-out units, however unequal their lengths."""
    evaluated: list[torch.Tensor] = []
    real = release.evaluate_blocks

    def spy(lm, blocks, *args, **kwargs):
        evaluated.append(blocks.clone())
        return real(lm, blocks, *args, **kwargs)

    monkeypatch.setattr(release, "evaluate_blocks", spy)
    site = Site(tmp_path, _notes(tmp_path / "notes.jsonl", range(USERS),
                                 long=tuple(range(0, USERS, 3))))
    policy = {"eval-release": "plain", "eval-min-units": "8", "heldout-fraction": "0.5"}
    reply = _send(site, ["data.heldout_blocks=8"], "evaluate", **policy)
    assert not reply.has_error(), reply.error.reason
    cfg = load_config("smoke-dp")
    node = dict(site.context(**policy).node_config)
    blocks = site_blocks(resolve_site(cfg, node), cfg.model, cfg.data,
                         policy_for(cfg, resolve_site(cfg, node), node))
    owner = {tuple(b.tolist()): int(u) for b, u in zip(blocks.heldout, blocks.heldout_units,
                                                       strict=True)}
    assert evaluated and all(len(q) == 8 for q in evaluated)
    for query in evaluated:
        assert len({owner[tuple(b.tolist())] for b in query}) == 8
