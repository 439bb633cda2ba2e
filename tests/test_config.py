"""Configuration: scenarios, config files and --set overrides load into a validated RunConfig."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

from fedcpt.config import (
    DataConfig,
    FederationConfig,
    LoraSettings,
    RunConfig,
    SiteConfig,
    TrainConfig,
    load_config,
    parse_overrides,
    scenario_names,
)
from fedcpt.config.reference import reference_markdown
from fedcpt.exceptions import ConfigError


@pytest.fixture
def toml_file(tmp_path):
    """Write a TOML config file and return its path."""

    def _write(text: str, name: str = "config.toml"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def test_scenarios_listed():
    assert {"smoke", "smoke-default", "shakespeare", "shakespeare-fedavg"} <= set(
        scenario_names())


@pytest.mark.parametrize("name", ["shakespeare", "smoke-default"])
def test_the_default_run_is_the_whole_product(name):
    """`fedcpt simulate` / `make demo` (and its smoke analogue): unit-level DP-SGD at every
    site within ε = 8, SecAgg+ (simulated signing identities), server-side protection."""
    cfg = load_config(name)
    assert cfg.privacy.enabled and not cfg.privacy.user_level
    assert 0 < cfg.privacy.target_epsilon <= 8.0
    assert cfg.site_policy.unit == "passage"
    assert cfg.secagg.mode == "on" and cfg.with_secagg_resolved(deployment=False).secagg.enabled
    assert cfg.strategy.rehearsal != "none" or cfg.strategy.distillation != "none"


def test_the_default_scenario_of_the_cli_is_the_default_run():
    import inspect

    from fedcpt.cli import simulate

    default = inspect.signature(simulate).parameters["scenario"].default.default
    assert default == "shakespeare"


def test_plain_fedavg_keeps_its_shipped_shape_under_its_own_name():
    """The reference the default run is measured against: plain FedAvg, 3 rounds × 4 steps
    × 8 blocks, no DP, no secure aggregation in a simulation, no protection."""
    cfg = load_config("shakespeare-fedavg")
    assert not cfg.privacy.enabled
    assert not cfg.with_secagg_resolved(deployment=False).secagg.enabled
    assert (cfg.federation.rounds, cfg.train.local_steps, cfg.train.batch_size) == (3, 4, 8)
    assert cfg.train.lr == pytest.approx(0.005)
    assert cfg.strategy == type(cfg.strategy)()
    assert [s.name for s in cfg.sites] == [s.name for s in load_config("shakespeare").sites]


@pytest.mark.parametrize("name", scenario_names())
def test_every_builtin_scenario_loads_under_its_own_name(name):
    assert load_config(name).name == name  # extends chains resolve, every key validates


def test_smoke_scenario_loads():
    cfg = load_config("smoke")
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "smoke"
    assert cfg.model.name == "tiny-llama"
    assert cfg.model.precision == "fp32"
    assert cfg.lora == LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    assert cfg.data.block_size == 64
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.federation.rounds == 2
    assert [s.name for s in cfg.sites] == ["comedies", "histories", "tragedies"]
    assert all(isinstance(s.data, tuple) for s in cfg.sites)


def test_unknown_scenario_lists_available():
    with pytest.raises(ConfigError, match=r"unknown scenario 'nosuch'; available: .*smoke"):
        load_config("nosuch")


def test_unknown_key_suggests_learning_rate():
    with pytest.raises(ConfigError,
                       match=r"unknown config key `train\.lr_rate` \(did you mean `train\.lr`\?\)"):
        load_config("smoke", overrides=["train.lr_rate=0.1"])


@pytest.mark.parametrize(("override", "message"), [
    ("train.lrr=0.1", r"unknown config key `train\.lrr` \(did you mean `train\.lr`\?\)"),
    ("train.local_step=3",
     r"unknown config key `train\.local_step` \(did you mean `train\.local_steps`\?\)"),
    ("federaton.rounds=2", r"unknown config key `federaton` \(did you mean `federation`\?\)"),
    ("lora.alpah=8", r"unknown config key `lora\.alpah` \(did you mean `lora\.alpha`\?\)"),
])
def test_unknown_key_suggests_close_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides=[override])


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError, match=r"^unknown config key `train\.zzzzzz`$"):
        load_config("smoke", overrides=["train.zzzzzz=1"])


def test_unknown_key_in_config_file(toml_file):
    path = toml_file("[data]\nblok_size = 32\n")
    with pytest.raises(ConfigError, match=r"`data\.blok_size` \(did you mean `data\.block_size`"):
        load_config("smoke", config_file=path)


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=-0.1", r"`train\.lr` must be > 0, got -0\.1"),
    ("train.lr=0", r"`train\.lr` must be > 0, got 0\.0"),
    ("federation.rounds=0", r"`federation\.rounds` must be > 0, got 0"),
    ("model.precision=fp8", r"`model\.precision` must be one of \['auto', 'bf16', 'fp32'\], "
                            r"got 'fp8'"),
    ("train.schedule=linear", r"`train\.schedule` must be one of \['constant', 'cosine'\]"),
    ("train.local_steps=ten", r"`train\.local_steps` must be a.* got 'ten'"),
    ("train.local_steps=2.5", r"`train\.local_steps` must be a.* got '2\.5'"),
    ("train.lr=fast", r"`train\.lr` must be a float, got 'fast'"),
    ("data.heldout_fraction=1.5", r"`data\.heldout_fraction` must be strictly between 0 and 1"),
    ("data.kl_eval_blocks=0", r"`data\.kl_eval_blocks` must be > 0, got 0"),
    ("data.block_size=4", r"`data\.block_size` must be at least 8, got 4"),
    ("lora.dropout=1", r"`lora\.dropout` must be in \[0, 1\), got 1\.0"),
    ("train.min_lr_ratio=2", r"`train\.min_lr_ratio` must be in \[0, 1\]"),
])
def test_bad_override_value_names_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides=[override])


@pytest.mark.parametrize(("toml", "message"), [
    ("[federation]\nrounds = 2.5\n", r"`federation\.rounds` must be an integer, got 2\.5"),
    ("[federation]\nrounds = true\n", r"`federation\.rounds` must be a number, got True"),
    ("[train]\nlr = \"x\"\n", r"`train\.lr` must be a float, got 'x'"),
    ("[model]\nname = 3\n", r"`model\.name` must be a string, got 3"),
    ("[lora]\ntarget_modules = 3\n", r"`lora\.target_modules` must be a list, got 3"),
    ("train = 3\n", r"`train` must be a table, got 3"),
    ("sites = \"a\"\n", r"`sites` must be a list of \[\[sites\]\] tables"),
])
def test_bad_value_in_config_file_names_key(toml_file, toml, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", config_file=toml_file(toml))


def test_overrides_coerce_types():
    cfg = load_config("smoke", overrides=[
        "train.lr=0.002", "federation.rounds=5", "lora.target_modules=q_proj,k_proj,v_proj",
        "model.name=tiny-llama", "seed=7", "data.heldout_fraction=0.25",
    ])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 0.002
    assert isinstance(cfg.federation.rounds, int) and cfg.federation.rounds == 5
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert cfg.seed == 7
    assert cfg.data.heldout_fraction == 0.25
    # untouched values come from the scenario
    assert cfg.train.local_steps == 4


def test_int_for_float_key_becomes_float():
    cfg = load_config("smoke", overrides=["train.lr=1"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_config_file_then_overrides_precedence(toml_file):
    path = toml_file("[train]\nlr = 0.005\nlocal_steps = 7\n")
    cfg = load_config("smoke", config_file=path, overrides=["train.lr=0.003"])
    assert cfg.train.lr == 0.003  # --set wins over the file
    assert cfg.train.local_steps == 7  # the file wins over the scenario
    assert cfg.train.batch_size == 4  # the scenario fills the rest


def test_config_file_sites_replace_scenario_sites(toml_file, tmp_path):
    path = toml_file('[[sites]]\nname = "only"\ndata = ["a.txt"]\n')
    cfg = load_config("smoke", config_file=path)
    assert cfg.sites == (SiteConfig(name="only", data=("a.txt",)),)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_config("smoke", config_file=missing)


def test_invalid_toml(toml_file):
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config("smoke", config_file=toml_file("[train\nlr = 1\n"))


@pytest.mark.parametrize("pair", ["train.lr", "=3", "   =1"])
def test_malformed_override(pair):
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config("smoke", overrides=[pair])


def test_sites_cannot_be_overridden():
    with pytest.raises(ConfigError, match=r"`sites` cannot be overridden with --set"):
        load_config("smoke", overrides=["sites.name=x"])


def test_parse_overrides_nests_and_keeps_strings():
    assert parse_overrides(["train.lr=0.002", "train.batch_size=4", "seed=1", "a.b.c= x "]) == {
        "train": {"lr": "0.002", "batch_size": "4"}, "seed": "1", "a": {"b": {"c": "x"}}}


def test_override_conflict():
    with pytest.raises(ConfigError, match=r"conflicts with another override"):
        parse_overrides(["seed=1", "seed.x=2"])


@pytest.mark.parametrize("key", ["sites_per_round", "eval_sites_per_round", "min_sites"])
def test_more_sites_per_round_than_sites_rejected(key):
    with pytest.raises(ConfigError,
                       match=rf"`federation\.{key}` must be at most the number of sites \(3\), "
                             r"got 4"):
        load_config("smoke", overrides=[f"federation.{key}=4"])


def test_sites_per_round_equal_to_sites_accepted():
    cfg = load_config("smoke", overrides=["federation.sites_per_round=3"])
    assert cfg.federation.sites_per_round == 3


def test_duplicate_site_names_rejected(toml_file):
    path = toml_file('[[sites]]\nname = "a"\ndata = ["x.txt"]\n\n'
                     '[[sites]]\nname = "b"\ndata = ["y.txt"]\n\n'
                     '[[sites]]\nname = "a"\ndata = ["z.txt"]\n')
    with pytest.raises(ConfigError, match=r"`sites\.name` must be unique site names, got \['a'\]"):
        load_config(config_file=path)


def test_site_without_data_rejected(toml_file):
    path = toml_file('[[sites]]\nname = "alpha"\ndata = []\n')
    with pytest.raises(ConfigError, match=r"`sites\[alpha\]\.data` must be at least one data"):
        load_config(config_file=path)


def test_no_sites_rejected(toml_file):
    with pytest.raises(ConfigError, match=r"`sites` must be at least one \[\[sites\]\] entry"):
        load_config(config_file=toml_file("seed = 1\n"))


def test_unknown_site_key_suggests(toml_file):
    path = toml_file('[[sites]]\nname = "a"\npaths = ["x.txt"]\n')
    with pytest.raises(ConfigError, match=r"unknown config key `sites\[0\]\.paths`"):
        load_config(config_file=path)


def test_json_round_trip():
    cfg = load_config("smoke", overrides=["train.lr=0.002", "federation.min_sites=2",
                                          "lora.target_modules=q_proj,k_proj"])
    text = cfg.to_json()
    again = RunConfig.from_json(text)
    assert again == cfg
    assert again.to_json() == text
    assert isinstance(again.lora.target_modules, tuple)
    assert isinstance(again.sites[0].data, tuple)


def test_from_json_validates():
    cfg = load_config("smoke")
    bad = cfg.to_json().replace('"rounds": 2', '"rounds": 0')
    with pytest.raises(ConfigError, match=r"`federation\.rounds` must be > 0"):
        RunConfig.from_json(bad)


def test_dataclass_constructors_validate():
    with pytest.raises(ConfigError, match=r"`train\.batch_size` must be > 0, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"`federation\.min_sites` must be >= 1, got 0"):
        FederationConfig(min_sites=0)
    with pytest.raises(ConfigError, match=r"`data\.heldout_fraction` must be strictly between"):
        DataConfig(heldout_fraction=0.0)


# --- learning-rate schedule ------------------------------------------------------------

def test_lr_constant_without_warmup():
    train = TrainConfig(lr=0.01)
    assert [train.lr_at(r, 5) for r in range(1, 6)] == [0.01] * 5


def test_lr_warmup_is_linear_and_reaches_peak():
    train = TrainConfig(lr=1.0, warmup_rounds=3, schedule="constant")
    assert [train.lr_at(r, 10) for r in (1, 2, 3)] == pytest.approx([0.25, 0.5, 0.75])
    assert train.lr_at(4, 10) == 1.0
    assert train.lr_at(10, 10) == 1.0
    assert train.lr_at(1, 10) > 0  # the first round never trains at lr 0


def test_lr_cosine_decays_from_peak_towards_floor():
    train = TrainConfig(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    lrs = [train.lr_at(r, 4) for r in range(1, 5)]
    assert lrs[0] == pytest.approx(1.0)
    # round 3 of 4 is two thirds of the way down the cosine
    assert lrs[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    assert lrs[3] == pytest.approx(0.1)  # the last round trains at the floor
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(0.1 <= lr <= 1.0 for lr in lrs)
    assert train.lr_at(99, 4) == pytest.approx(0.1)  # never below the floor


def test_lr_cosine_after_warmup():
    train = TrainConfig(lr=2.0, schedule="cosine", warmup_rounds=2, min_lr_ratio=0.0)
    assert train.lr_at(1, 6) == pytest.approx(2.0 / 3)
    assert train.lr_at(2, 6) == pytest.approx(4.0 / 3)
    assert train.lr_at(3, 6) == pytest.approx(2.0)  # first round after warm-up: peak
    expected = 2.0 * 0.5 * (1 + math.cos(math.pi * 2 / 3))
    assert train.lr_at(5, 6) == pytest.approx(expected)
    assert train.lr_at(6, 6) == pytest.approx(0.0)


def test_site_without_a_name_is_a_clear_error(tmp_path):
    path = tmp_path / "sites.toml"
    path.write_text('[[sites]]\ndata = ["x.txt"]\n')
    with pytest.raises(ConfigError, match=r"`sites\[0\]\.name` is required"):
        load_config("smoke", config_file=path)


@pytest.mark.parametrize("override, key", [
    ("privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
    ("privacy.target_delta=1", "privacy.target_delta"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
    ("privacy.accountant=gdp", "privacy.accountant"),
])
def test_impossible_privacy_settings_are_rejected(override, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config("smoke-dp", overrides=[override])


def test_site_level_dp_refuses_server_steps_that_change_the_aggregate():
    with pytest.raises(ConfigError, match="privacy.user_level cannot be combined"):
        load_config("smoke", overrides=["privacy.user_level=true", "strategy.rehearsal=mix"])


def test_rehearsal_pool_too_small_is_a_clear_error(write_text):
    from fedcpt.server.app import general_data

    general = write_text("general.txt", 20_000)
    cfg = load_config("smoke", overrides=["strategy.rehearsal=finetune",
                                          f"data.general={general}",
                                          "strategy.rehearsal_val_blocks=100000"])
    with pytest.raises(ConfigError, match="rehearsal pool has"):
        general_data(cfg)


def test_anchor_pull_that_would_erase_each_step_is_rejected():
    with pytest.raises(ConfigError, match="train.lr × anchor_weight < 1"):
        load_config("smoke", overrides=["strategy.anchor=l2sp", "strategy.anchor_weight=200"])


def test_embedding_adapters_are_rejected():
    with pytest.raises(ConfigError, match="linear layers only"):
        load_config("smoke", overrides=["lora.target_modules=q_proj,embed_tokens"])


# --- the generated reference (docs/configuration.md) -----------------------------------
def _leaf_fields(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, args = hints[f.name], typing.get_args(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        elif args and dataclasses.is_dataclass(args[0]):
            yield from _leaf_fields(args[0], f"{prefix}{f.name}[].")
        else:
            yield f"{prefix}{f.name}", f


def test_every_setting_has_help_and_is_in_the_reference():
    text = reference_markdown()
    missing = [key for key, f in _leaf_fields(RunConfig) if not f.metadata.get("help")]
    assert missing == []
    for key, _ in _leaf_fields(RunConfig):
        assert f"`{key.split('[].')[-1]}`" in text, key  # [[sites]] keys: `name`, `data`


def test_committed_reference_is_current():
    committed = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text("utf-8")
    assert committed == reference_markdown(), (
        "docs/configuration.md is stale: run "
        "`python -m fedcpt.config.reference > docs/configuration.md`")


def test_eval_every_evaluates_every_kth_round_the_last_and_each_phase_end():
    cfg = load_config("smoke", overrides=["federation.rounds=7", "federation.eval_every=3"])
    assert [r for r in range(8) if cfg.evaluates(r)] == [0, 3, 6, 7]
    assert all(load_config("smoke").evaluates(r) for r in range(3))  # default: every round
    phased = load_config("smoke-phases", overrides=["federation.eval_every=100"])
    ends = [0] + [ph.last_round for ph in phased.phase_plan()]
    assert [r for r in range(phased.federation.rounds + 1) if phased.evaluates(r)] == ends


def test_eval_every_below_one_is_refused():
    with pytest.raises(ConfigError, match="federation.eval_every"):
        FederationConfig(eval_every=0)


@pytest.mark.parametrize("name", scenario_names())
def test_each_scenario_summary_is_one_whole_sentence(name):
    from fedcpt.config.loading import scenario_summary

    summary = scenario_summary(name)
    assert summary.endswith((".", "!", "?")), summary
    assert "#" not in summary and len(summary) > 20
