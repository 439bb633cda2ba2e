"""General text in kinds: the evaluation sets, the rehearsal pool's stated mix, and kinds
that never reach the pool."""

from __future__ import annotations

import pytest
import torch

from fedcpt.config import DataConfig, GeneralSet, RunConfig, SiteConfig, load_config
from fedcpt.core.general import load_general, mix_pool, pool_counts
from fedcpt.exceptions import ConfigError


def test_pool_counts_follow_the_shares_up_to_the_scarcest_kind():
    assert pool_counts({"a": 100, "b": 100}, {"a": 3, "b": 1}) == {"a": 100, "b": 33}
    assert pool_counts({"a": 10, "b": 100}, {"a": 0.5, "b": 0.5}) == {"a": 10, "b": 10}
    assert pool_counts({"a": 10, "b": 100}, {"a": 0.0, "b": 1.0}) == {"b": 100}
    assert pool_counts({"a": 10}, {}) == {}


def test_mix_pool_draws_each_kind_by_its_share_and_shuffles():
    train = {"a": torch.zeros(90, 4, dtype=torch.long), "b": torch.ones(40, 4, dtype=torch.long)}
    pool, counts = mix_pool(train, {"a": 0.75, "b": 0.25})
    assert counts == {"a": 90, "b": 30}
    assert int((pool[:, 0] == 1).sum()) == 30 and len(pool) == 120
    assert not torch.equal(pool[:30, 0], torch.zeros(30, dtype=torch.long))  # mixed, not stacked
    assert torch.equal(mix_pool(train, {"a": 0.75, "b": 0.25})[0], pool)  # deterministic


def _rows(blocks: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(row.tolist()) for row in blocks}


def test_load_general_keeps_out_of_pool_kinds_out_of_training(tmp_path, make_text, byte_tok):
    paths = {}
    for i, name in enumerate(("prose", "code", "legal", "chat")):
        # numbered paragraphs: no two blocks of any kind can be equal by chance
        paras = make_text(30_000, seed=i).split("\n\n")
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("\n\n".join(f"{name} {j}: {p}" for j, p in enumerate(paras)))
    data = DataConfig(block_size=64, general_eval_blocks=8, general_eval=(
        GeneralSet("prose", (str(paths["prose"]),), 0.5),
        GeneralSet("code", (str(paths["code"]),), 0.5),
        GeneralSet("legal", (str(paths["legal"]),)),
        GeneralSet("chat", (str(paths["chat"]),)),
    ))
    corpus = load_general(data, byte_tok, validation_blocks=4)
    assert list(corpus.evaluation) == ["prose", "code", "legal", "chat"]
    assert corpus.in_pool == ("prose", "code") and corpus.out_of_pool == ("legal", "chat")
    assert all(len(v) == 8 for v in corpus.evaluation.values())
    assert corpus.mix["prose"] == corpus.mix["code"]
    assert len(corpus.pool) + len(corpus.validation) == sum(corpus.mix.values())
    trained = _rows(corpus.pool) | _rows(corpus.validation)
    for kind, blocks in corpus.evaluation.items():
        assert not _rows(blocks) & trained, f"{kind} evaluation blocks reached the pool"


def test_general_shorthand_is_one_pooled_kind():
    data = DataConfig(general=("stdlib:topics",))
    assert data.general_kinds() == (GeneralSet("general", ("stdlib:topics",), 1.0),)
    default = DataConfig().general_kinds()
    assert len(default) >= 4
    assert sum(1 for k in default if k.rehearsal_share == 0) >= 2


def test_builtin_scenarios_use_four_kinds_two_out_of_pool():
    for name in ("smoke", "shakespeare-fedavg", "shakespeare"):
        kinds = load_config(name).data.general_kinds()
        assert len(kinds) >= 4, name
        assert sum(1 for k in kinds if k.rehearsal_share == 0) >= 2, name


@pytest.mark.parametrize("kinds, message", [
    ((GeneralSet("a", ("x",)), GeneralSet("a", ("y",))), r"data.general_eval.name.*unique"),
    ((), r"data.general_eval.*at least one kind"),
])
def test_general_kinds_are_validated(kinds, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(general_eval=kinds)


def test_a_general_kind_needs_sources_and_a_non_negative_share():
    with pytest.raises(ConfigError, match=r"data.general_eval\[x\].sources"):
        GeneralSet("x", ())
    with pytest.raises(ConfigError, match=r"data.general_eval\[x\].rehearsal_share.*>= 0"):
        GeneralSet("x", ("stdlib:code",), -0.5)


def test_a_site_cannot_train_on_general_evaluation_text():
    data = DataConfig(general_eval=(GeneralSet("legal", ("licenses:packages",)),))
    with pytest.raises(ConfigError,
                       match=r"data.general_eval.*no site trains on.*licenses:packages"):
        RunConfig(sites=(SiteConfig("law", ("licenses:packages",)),), data=data)


def test_stream_scenarios_have_three_phases_of_distinct_domains():
    for name in ("smoke-stream", "shakespeare-stream"):
        cfg = load_config(name)
        plan = cfg.phase_plan()
        assert len(plan) >= 3, name
        sources = [{src.split(":")[0] for site in cfg.sites if site.name in ph.sites
                    for src in site.data} for ph in plan]
        assert all(not a & b for i, a in enumerate(sources) for b in sources[i + 1:]), name
