"""Bad configuration: unknown or mistyped keys, values out of range, contradictory
sections, unreadable config files, and DP budgets no plan can meet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedcpt.config import PrivacyConfig, load_config
from fedcpt.privacy.plan import plan_site
from fedcpt.testing.bad_inputs.judge import BadInput


def _override(*pairs: str) -> Callable[[Path], object]:
    return lambda folder: load_config("smoke", overrides=list(pairs))


def _config_file(text: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        (folder / "run.toml").write_text(text, encoding="utf-8")
        return load_config("smoke", config_file=folder / "run.toml")
    return attempt


CONFIG = [
    BadInput("config-unknown-key", "config", _override("train.lrr=0.1"),
             r"unknown config key `train.lrr`.*`train.lr`"),
    BadInput("config-unknown-section", "config", _override("trainer.lr=0.1"),
             r"unknown config key `trainer`"),
    BadInput("config-int-not-a-number", "config", _override("train.local_steps=ten"),
             r"`train.local_steps` must be an integer"),
    BadInput("config-float-for-int", "config", _override("train.local_steps=2.5"),
             r"`train.local_steps` must be an integer"),
    BadInput("config-bad-bool", "config", _override("privacy.enabled=maybe"),
             r"`privacy.enabled` must be true or false"),
    BadInput("config-negative-lr", "config", _override("train.lr=-0.1"), r"`train.lr` must be > 0"),
    BadInput("config-nan-lr", "config", _override("train.lr=nan"), r"`train.lr` must be"),
    BadInput("config-heldout-fraction-out-of-range", "config",
             _override("data.heldout_fraction=1.5"), r"`data.heldout_fraction` must be strictly"),
    BadInput("config-unknown-choice", "config", _override("model.precision=fp8"),
             r"`model.precision` must be one of"),
    BadInput("config-zero-rounds", "config", _override("federation.rounds=0"),
             r"`federation.rounds` must be"),
    BadInput("config-min-sites-above-sites", "config", _override("federation.min_sites=9"),
             r"`federation.min_sites` must be at most the number of sites"),
    BadInput("config-user-level-with-rehearsal", "config",
             _override("privacy.user_level=true", "strategy.rehearsal=mix"),
             r"user_level cannot be combined with strategy.rehearsal"),
    BadInput("config-anchor-overshoots", "config",
             _override("strategy.anchor=fedprox", "strategy.anchor_weight=1000"),
             r"`strategy.anchor_weight` must be small enough"),
    BadInput("config-embedding-adapter", "config", _override("lora.target_modules=embed_tokens"),
             r"`lora.target_modules` must be linear layers only"),
    BadInput("config-override-without-value", "config", _override("train.lr"),
             r"must look like section.key=value"),
    BadInput("config-sites-in-override", "config", _override("sites=[]"),
             r"`sites` cannot be overridden with --set"),
    BadInput("config-file-missing", "config",
             lambda f: load_config("smoke", config_file=f / "missing.toml"),
             r"config file not found"),
    BadInput("config-file-not-toml", "config", _config_file("[train\nlr = "),
             r"is not valid TOML"),
    BadInput("config-unknown-scenario", "config", lambda f: load_config("smok"),
             r"unknown scenario 'smok'"),
    BadInput("config-duplicate-site-names", "config", _config_file(
        '[[sites]]\nname = "a"\ndata = ["x.txt"]\n[[sites]]\nname = "a"\ndata = ["y.txt"]\n'),
        r"`sites.name` must be unique site names"),
    BadInput("config-site-without-data", "config",
             _config_file('[[sites]]\nname = "a"\ndata = []\n'),
             r"`sites\[a\].data` must be at least one data source"),
    BadInput("config-impossible-dp-budget", "config", lambda f: plan_site(
        PrivacyConfig(enabled=True, target_epsilon=1e-4), site="a", records=100, batch_size=50,
        steps=10_000), r"privacy budget ε=0.0001.* is too small"),
    BadInput("config-dp-budget-already-spent", "config", lambda f: plan_site(
        PrivacyConfig(enabled=True, target_epsilon=1.0), site="a", records=100, batch_size=10,
        steps=10, prior=[(0.5, 0.1, 1000)]), r"the budget ε=1.0 is already spent"),
]
