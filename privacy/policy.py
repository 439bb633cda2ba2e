"""A site's privacy policy: everything its guarantee depends on, set by the site itself.

The server may *propose* stricter values in the run config (a smaller δ or ε budget, a
smaller held-out share, a larger evaluation query, a smaller share of units trained on),
never looser ones: a proposal that would loosen the policy is refused with a reason that
names the key (:func:`accept_proposal`). Every run input that selects or shapes the site's
data or model — the text column, the block size, the cap, the model it opens — may only be
one of the values the site allows, checked before any data is read or any model opened
(:func:`check_inputs`); a refusal does not say which paths exist at the site. A deployed
site sets its policy in ``--node-config`` keys or a TOML file named by ``policy-file``; in
simulation the ``[sites.policy]`` table (then the scenario's ``[site_policy]``) stands in
for it. Every value records who set it.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcpt.config import EVAL_RELEASES, DataConfig, ModelConfig, RunConfig, SiteConfig
from fedcpt.core.data import parse_unit
from fedcpt.core.model import BUILTIN_MODELS
from fedcpt.exceptions import ConfigError, DataError
from fedcpt.privacy.accounting import MIN_DELTA
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.secagg.ddp import MAX_GRID_INFLATION, DistributedDP
from fedcpt.privacy.site_files import LEDGER_SUFFIX

log = logging.getLogger(__name__)

# node_config key → SitePolicy field (a deployed SuperNode sets these with --node-config)
NODE_KEYS = {
    "privacy-unit": "unit",
    "delta": "delta",
    "epsilon-budget": "epsilon_budget",
    "ledger-path": "ledger_path",
    "heldout-fraction": "heldout_fraction",
    "eval-release": "eval_release",
    "eval-min-units": "eval_min_units",
    "eval-noise-multiplier": "eval_noise_multiplier",
    "eval-loss-bound": "eval_loss_bound",
    "require-dp": "require_dp",
    "min-user-noise-multiplier": "min_user_noise_multiplier",
    "min-dishonest-fraction": "min_dishonest_fraction",
    "site-level-epsilon-budget": "site_level_epsilon_budget",
    "secagg-colluders": "secagg_colluders",
    "max-lora-rank": "max_lora_rank",
    "text-fields": "text_fields",
    "block-sizes": "block_sizes",
    "allowed-models": "models",
    "train-share": "train_share",
    "public-units": "public_units",
}
POLICY_FILE_KEY = "policy-file"
DP_BY_DEFAULT = ("site default: DP on, as the site sets an ε budget or a ledger location "
                 "(`require-dp = false` turns it off)")
DEFAULT_DELTA_CAP = 1e-5
SITE_DEFAULTS: dict[str, Any] = {
    "unit": "document", "delta": 0.0, "epsilon_budget": 8.0, "ledger_path": "",
    "heldout_fraction": 0.1, "eval_min_units": 8, "eval_noise_multiplier": 4.0,
    "eval_loss_bound": 10.0, "require_dp": False, "min_user_noise_multiplier": 0.0,
    "min_dishonest_fraction": 0.0, "site_level_epsilon_budget": 0.0, "secagg_colluders": 1,
    "max_lora_rank": 0,
    "text_fields": ("text",), "block_sizes": (64, 128, 256, 512), "models": BUILTIN_MODELS,
    "train_share": 1.0, "public_units": 0,
}
DEFAULT_COLLUDERS_NOTE = (
    "1: a federation of 3 to 7 sites (docs/deploy.md) cannot rule out that one site "
    "shares its keys with the server, and a majority threshold falls to one such site")
# What a simulated site allows when its tables say nothing: what the scenario runs (the
# scenario's author is the simulated site). A deployed site never reads the run config.
SIMULATED_CHOICES = {"text_fields": "data.text_field", "block_sizes": "data.block_size",
                     "models": "model.name"}


def model_id(model: ModelConfig) -> str:
    """What a site's ``allowed-models`` names: ``model.name``, or ``name/gguf_file`` for
    one GGUF file inside a directory or hub repo."""
    return f"{model.name}/{model.gguf_file}" if model.gguf_file else model.name


def default_delta(units: int) -> float:
    """The site-side default δ: min(1e-5, 1/(10·N)) for N units, well below 1/N."""
    return min(DEFAULT_DELTA_CAP, 1.0 / (10 * units))


N_DEPENDENT_NOTE = (
    "no `public-units` set: the noise multiplier σ is planned at q = batch / N and budget "
    "refusals are decided on ε at that q, so the update's noise scale and the round at which "
    "the site refuses are functions of its number of training units N that ε does not "
    "cover; set `public-units` (a unit count the site declares public, at most N) to plan "
    "and refuse from public values only")


class PolicyRefused(SiteRefused):
    """A server proposal would loosen the site's policy; the site refuses it."""


@dataclass(frozen=True)
class SitePolicy:
    """The policy in force at one site, with who set each value (``set_by``).

    ``delta`` 0 means the site default, min(1e-5, 1/(10·N)) for N units
    (:meth:`delta_for`); ``ledger_path`` '' means none (DP then cannot run)."""

    site: str
    unit: str
    delta: float
    epsilon_budget: float
    ledger_path: str
    heldout_fraction: float
    eval_release: str
    eval_min_units: int
    eval_noise_multiplier: float
    eval_loss_bound: float
    require_dp: bool
    min_user_noise_multiplier: float
    """Floor on the site-level noise multiplier z this site adds under SecAgg (0: the site
    does not require site-level DP)."""
    min_dishonest_fraction: float
    """Floor on the fraction of sampled sites assumed to collude with the server when the
    site calibrates its site-level noise."""
    site_level_epsilon_budget: float
    """Cap on the site-level ε of every site-level release the site has recorded, across
    runs (:mod:`fedcpt.privacy.secagg.site_level_record`; 0: counted, not capped)."""
    secagg_colluders: int
    """Other sites this site assumes may collude with the server: it masks nothing under a
    reconstruction threshold t that k colluders could beat among its n neighbours
    (it needs 2t > n + k). Default 1 (:data:`DEFAULT_COLLUDERS_NOTE`)."""
    text_fields: tuple[str, ...]
    """The JSONL / parquet / datasets columns the server may choose as ``data.text_field``."""
    block_sizes: tuple[int, ...]
    """The ``data.block_size`` values the server may choose (each changes N)."""
    models: tuple[str, ...]
    """The models (:func:`model_id`) the server may ask the site to open."""
    train_share: float
    """The cap on the trained set: the share of training units kept, each by the site's
    salted hash (1: all; the server may propose a smaller ``data.train_share``)."""
    public_units: int = 0
    """A unit count the site declares public, at most its N (0: none). When set, σ and
    every budget refusal are planned at the public rate batch / public_units (an upper
    bound on q), so neither depends on N; the ledger still records the real q and ε."""
    max_lora_rank: int = 0
    """Highest LoRA rank the site trains (0: the run's ``lora.r``); below ``lora.r`` it
    trains the global adapter truncated to this rank (:mod:`fedcpt.core.ranks`)."""
    set_by: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        try:
            parse_unit(self.unit)
        except DataError as err:
            raise ConfigError(f"site {self.site!r}: {err} ({self.who('unit')})") from None
        checks = (
            ("delta", self.delta == 0 or MIN_DELTA <= self.delta < 1,
             f"0 (the site default) or in [{MIN_DELTA:g}, 1): the accountant computes no "
             "ε below it"),
            ("epsilon_budget", self.epsilon_budget > 0, "> 0"),
            ("heldout_fraction", 0 < self.heldout_fraction < 1, "strictly between 0 and 1"),
            ("eval_release", self.eval_release in EVAL_RELEASES,
             f"one of {list(EVAL_RELEASES)} (`secagg`: the loss only as a sum with the "
             "other sites' under secure aggregation)"),
            ("eval_min_units", self.eval_min_units >= 1, ">= 1"),
            ("eval_noise_multiplier", self.eval_noise_multiplier > 0, "> 0"),
            ("eval_loss_bound", self.eval_loss_bound > 0, "> 0"),
            ("min_user_noise_multiplier", self.min_user_noise_multiplier >= 0,
             ">= 0 (0: site-level DP not required)"),
            ("min_dishonest_fraction", 0 <= self.min_dishonest_fraction < 1, "in [0, 1)"),
            ("site_level_epsilon_budget", self.site_level_epsilon_budget >= 0,
             ">= 0 (0: counted, not capped)"),
            ("secagg_colluders", self.secagg_colluders >= 0, ">= 0"),
            ("max_lora_rank", self.max_lora_rank >= 0, ">= 0 (0: the run's lora.r)"),
            ("text_fields", bool(self.text_fields) and all(f.strip() for f in self.text_fields),
             "a non-empty list of column names"),
            ("block_sizes", bool(self.block_sizes) and all(b >= 8 for b in self.block_sizes),
             "a non-empty list of sizes, each at least 8"),
            ("models", bool(self.models) and all(m.strip() for m in self.models),
             "a non-empty list of model ids or paths"),
            ("train_share", 0 < self.train_share <= 1, "in (0, 1] (1: every unit)"),
            ("public_units", self.public_units >= 0, ">= 0 (0: none declared)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"site {self.site!r}: policy `{name}` must be {expected}, "
                                  f"got {getattr(self, name)!r} ({self.who(name)})")

    def who(self, name: str) -> str:
        """Who set field ``name``: the site's node config, its policy file, a simulated
        table, or the site default."""
        return dict(self.set_by).get(name, "site default")

    def delta_for(self, units: int) -> float:
        """δ for ``units`` training units: the site's, else min(1e-5, 1/(10·N)). A δ at or
        above 1/N would allow releasing one unit's data outright, and is refused.

        With ``public_units`` P the default is min(1e-5, 1/(10·P)), a function of public
        values only; it is refused (a local misconfiguration) where it exceeds what the
        rule above gives for N (N > max(P, 10⁴)): δ is never looser than without P. Fewer
        than P units is refused too. These refusals depend on N: they fire on every
        request alike, and their reason stays in the site's log."""
        if units <= 0:
            raise ConfigError(f"site {self.site!r} has no training units")
        if self.public_units and units < self.public_units:
            raise ConfigError(
                f"site {self.site!r} trains on {units} units, fewer than its public-units "
                f"{self.public_units} ({self.who('public_units')}): the public bound on the "
                f"sample rate would not hold; lower public-units to at most {units} (for "
                "every block size and text field the site allows)")
        if not self.delta and self.public_units:
            public = default_delta(self.public_units)
            if public > default_delta(units):
                raise ConfigError(
                    f"site {self.site!r}: the default δ from public-units "
                    f"{self.public_units}, {public:.3g}, is above min(1e-5, 1/(10·N)) = "
                    f"{default_delta(units):.3g} for its {units} units; set `delta` "
                    f"explicitly (at most {default_delta(units):.2g}) or raise public-units")
            return public
        if not self.delta:
            return default_delta(units)
        if self.delta >= 1.0 / units:
            raise ConfigError(f"site {self.site!r}: δ={self.delta:g} ({self.who('delta')}) is "
                              f"at least 1/N = 1/{units}; choose δ ≪ 1/N, e.g. "
                              f"{min(DEFAULT_DELTA_CAP, 1 / (10 * units)):.2g}")
        return self.delta

    def record(self) -> dict[str, dict]:
        """Each value and who set it, as kept in the ledger and shown in the report."""
        return {f.name: {"value": getattr(self, f.name), "set_by": self.who(f.name)}
                for f in dataclasses.fields(self) if f.name not in ("site", "set_by")}

    def lines(self) -> list[str]:
        """The policy in force, one line per value with who set it (for `site check`)."""
        k = self.secagg_colluders
        shown = {"delta": self.delta or (f"min(1e-5, 1/(10·public_units)) = "
                                         f"{default_delta(self.public_units):.3g}"
                                         if self.public_units else "min(1e-5, 1/(10·N))"),
                 "public_units": (f"{self.public_units} (σ and budget refusals planned at "
                                  "batch / public_units: public values only)"
                                  if self.public_units else f"0 (none): {N_DEPENDENT_NOTE}"),
                 "ledger_path": self.ledger_path or "(none)",
                 "site_level_epsilon_budget": self.site_level_epsilon_budget or (
                     "0 (site-level releases counted in <name>.site-level.json, not capped)"),
                 "secagg_colluders": f"{k} (assumes up to {k} other site(s) collude with the "
                                     f"server: masks only under a threshold t with 2t > n + "
                                     f"{k} over its n neighbours)"}
        return [f"policy {f.name}: {shown.get(f.name, _show(getattr(self, f.name)))} "
                f"[{self.who(f.name)}]"
                for f in dataclasses.fields(self) if f.name not in ("site", "set_by")]


def _show(value: Any) -> Any:
    return ", ".join(map(str, value)) if isinstance(value, tuple) else value


def read_policy_file(path: Path) -> dict[str, Any]:
    """A policy file: TOML with the node-config keys (``privacy-unit = "field:user_id"``)."""
    if not path.is_file():
        raise ConfigError(f"policy file {path} not found (node-config `{POLICY_FILE_KEY}`)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"policy file {path} is not valid TOML: {err}") from None
    unknown = sorted(set(raw) - set(NODE_KEYS))
    if unknown:
        raise ConfigError(f"policy file {path}: unknown key(s) {unknown}; a policy sets "
                          f"{sorted(NODE_KEYS)}")
    return raw


def _typed(name: str, value: Any, where: str) -> Any:
    default = SITE_DEFAULTS.get(name, "")
    if isinstance(default, tuple):  # a list: TOML / a table's tuple, or "a,b" in node config
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where} sets `{name}` to {value!r}, which is not a list")
        return tuple(_typed_item(name, item, type(default[0]), where) for item in items
                     if not isinstance(item, str) or item.strip())
    try:
        if isinstance(default, bool):
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError
            return text in ("true", "1")
        if isinstance(value, bool) or (isinstance(default, int) and isinstance(value, float)
                                       and not value.is_integer()):
            raise ValueError  # a count is never rounded silently
        return type(default)(value) if not isinstance(default, str) else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} sets `{name}` to {value!r}, which is not a "
                          f"{type(default).__name__}") from None


def _typed_item(name: str, item: Any, kind: type, where: str) -> Any:
    what = {int: "a whole number", str: "a string"}[kind]
    if isinstance(item, bool) or (kind is str and not isinstance(item, str)) or (
            kind is int and isinstance(item, float)):
        raise ConfigError(f"{where} sets `{name}` to a list holding {item!r}, which is not "
                          f"{what}")
    try:
        return kind(item.strip() if isinstance(item, str) else item)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} sets `{name}` to a list holding {item!r}, which is not "
                          f"{what}") from None


def site_policy(cfg: RunConfig | None, site: SiteConfig, node_config: dict,
                deployed: bool) -> SitePolicy:
    """The policy in force at ``site``: node config, then its policy file (deployed: the
    run config ``cfg`` is not read), or the simulated tables of ``cfg``; then defaults.
    ``eval_release`` defaults to ``nothing`` when the site requires DP (nothing un-noised
    leaves), else ``plain``."""
    values: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    if deployed:
        layers: list[tuple[str, dict[str, Any]]] = [
            ("site node config", {NODE_KEYS[k]: v for k, v in node_config.items()
                                  if k in NODE_KEYS})]
        if POLICY_FILE_KEY in node_config:
            path = Path(str(node_config[POLICY_FILE_KEY])).expanduser()
            layers.append((f"site policy file {path}",
                           {NODE_KEYS[k]: v for k, v in read_policy_file(path).items()}))
    else:
        if cfg is None:
            raise ValueError("a simulated site's policy needs the run config")  # a bug
        unset = dataclasses.asdict(type(site.policy)())
        layers = [(f"simulated site table [sites.policy] of {site.name!r}",
                   {k: v for k, v in dataclasses.asdict(site.policy).items()
                    if v != unset[k]}),
                  ("simulation default [site_policy]",
                   {k: v for k, v in dataclasses.asdict(cfg.site_policy).items()
                    if v != unset[k]})]
    for where, layer in layers:
        for name, value in layer.items():
            if name not in values:
                values[name] = _typed(name, value, where)
                set_by[name] = where
    if deployed and "require_dp" not in values and (
            "epsilon_budget" in values or "ledger_path" in values):
        # a site that keeps a budget or a ledger has chosen DP: the server cannot switch
        # it off (turning it off is the site's own `require-dp = false`)
        values["require_dp"] = True
        set_by["require_dp"] = DP_BY_DEFAULT
    if not deployed and cfg is not None:
        run_values = {"text_fields": (cfg.data.text_field,),
                      "block_sizes": (cfg.data.block_size,), "models": (model_id(cfg.model),)}
        for name, key in SIMULATED_CHOICES.items():
            if name not in values:
                values[name], set_by[name] = run_values[name], f"simulation: the run's {key}"
    for name, default in SITE_DEFAULTS.items():
        values.setdefault(name, default)
    if "eval_release" not in values:
        values["eval_release"] = "nothing" if values["require_dp"] else "plain"
        set_by["eval_release"] = ("site default (require-dp: nothing un-noised)"
                                  if values["require_dp"] else "site default")
    if not values["ledger_path"] and cfg is not None and not deployed and \
            cfg.privacy.ledger_dir:
        values["ledger_path"] = str(Path(cfg.privacy.ledger_dir) / f"{site.name}{LEDGER_SUFFIX}")
        set_by["ledger_path"] = "simulation: the run's privacy.ledger_dir"
    return SitePolicy(site=site.name, set_by=tuple(sorted(set_by.items())), **values)


@dataclass(frozen=True)
class RunInputs:
    """The data and model inputs of one run at one site, each among the values its policy
    allows (:func:`check_inputs`)."""

    text_field: str
    block_size: int
    model: str
    train_share: float
    train_share_by: str
    """Who set the share in force: the site's policy, or the server (tightened)."""

    def lines(self) -> list[str]:
        """The run's choices, for `site check` against a scenario."""
        return [f"run data.text_field: {self.text_field} [server, among the site's "
                "text_fields]",
                f"run data.block_size: {self.block_size} [server, among the site's "
                "block_sizes]",
                f"run model: {self.model} [server, among the site's models]",
                f"run train_share: {self.train_share:g} [{self.train_share_by}]"]


def check_inputs(policy: SitePolicy, data: DataConfig, model: ModelConfig) -> RunInputs:
    """Before any data is read or any model opened: every run input that selects or shapes
    the site's data or model must be one the site allows; raises PolicyRefused naming the
    key. The reason is the same whether or not a path or column exists at the site, and
    does not list what the site allows (its operator sees that in `fedcpt site check`)."""
    asked = model_id(model)
    choices = (
        ("model.name" if not model.gguf_file else "model.gguf_file", asked,
         asked in policy.models, "a model", "models", "allowed-models"),
        ("data.text_field", data.text_field, data.text_field in policy.text_fields,
         "a text column", "text_fields", "text-fields"),
        ("data.block_size", data.block_size, data.block_size in policy.block_sizes,
         "a block size", "block_sizes", "block-sizes"),
    )
    for key, value, allowed, what, name, node_key in choices:
        if not allowed:
            raise PolicyRefused(
                f"site {policy.site!r} refuses `{key}` = {value!r}: not {what} its policy "
                f"allows ({node_key}, {policy.who(name)}); it reads and opens nothing else")
    if data.heldout_fraction > policy.heldout_fraction:
        raise PolicyRefused(
            f"site {policy.site!r} refuses `data.heldout_fraction` = "
            f"{data.heldout_fraction:g}: it would loosen the site's held-out fraction "
            f"{policy.heldout_fraction:g} ({policy.who('heldout_fraction')}); the server may "
            "only propose stricter values")
    proposed = data.train_share
    if proposed > policy.train_share:
        raise PolicyRefused(
            f"site {policy.site!r} refuses `data.train_share` = {proposed:g}: it would "
            f"loosen the site's cap, a share of {policy.train_share:g} of its units "
            f"({policy.who('train_share')}); the server may only propose stricter values")
    tightened = 0 < proposed < policy.train_share
    if tightened and policy.public_units:
        # a smaller share shrinks N below what public-units was declared for, and the
        # site's refusal when N < public-units would then tell the server about N
        raise PolicyRefused(
            f"site {policy.site!r} refuses `data.train_share` = {proposed:g}: it declares "
            f"public-units {policy.public_units} ({policy.who('public_units')}) for its own "
            f"share {policy.train_share:g}, and a smaller share could take N below it")
    return RunInputs(
        text_field=data.text_field, block_size=data.block_size, model=asked,
        train_share=proposed if tightened else policy.train_share,
        train_share_by="server, tightened" if tightened else policy.who("train_share"))


@dataclass(frozen=True)
class RunTerms:
    """What a site accepts for one run: its policy, tightened where the server asked."""

    delta: float
    """δ for this run: the site's, or the server's stricter proposal (this run only)."""
    epsilon_budget: float
    site_delta: float | None = None
    """The site's own δ, which its ledger keeps (None: ``delta``)."""

    @property
    def own_delta(self) -> float:
        return self.delta if self.site_delta is None else self.site_delta


def accept_proposal(policy: SitePolicy, cfg: RunConfig, units: int) -> RunTerms:
    """Check the server's run config against the site's policy; raises PolicyRefused
    naming the key when a proposal would loosen it, else returns the (possibly tightened)
    terms. ``data.heldout_fraction`` is checked before any data is read
    (:func:`check_inputs`), ``data.heldout_blocks`` when evaluating (:func:`check_query`)."""
    site_delta = policy.delta_for(units)
    proposals = (
        ("privacy.target_delta", cfg.privacy.target_delta, site_delta, "δ", "delta"),
        ("privacy.target_epsilon", cfg.privacy.target_epsilon, policy.epsilon_budget,
         "ε budget", "epsilon_budget"),
    )
    for key, proposed, own, what, name in proposals:
        if key.startswith("privacy.") and not cfg.privacy.enabled:
            continue  # a run without DP-SGD proposes no δ or budget
        if proposed and proposed > own:
            raise PolicyRefused(
                f"site {policy.site!r} refuses `{key}` = {proposed:g}: it would loosen the "
                f"site's {what} {own:g} ({policy.who(name)}); the server may only propose "
                "stricter values")
    proposed_delta = cfg.privacy.target_delta if cfg.privacy.enabled else 0.0
    if proposed_delta and proposed_delta < MIN_DELTA:
        raise PolicyRefused(
            f"site {policy.site!r} refuses `privacy.target_delta` = {proposed_delta:g}: "
            f"below {MIN_DELTA:g}, the smallest δ at which its accountant computes ε")
    return RunTerms(delta=min(site_delta, proposed_delta or site_delta),
                    epsilon_budget=min(policy.epsilon_budget, cfg.privacy.target_epsilon),
                    site_delta=site_delta)


def check_query(policy: SitePolicy, cfg: RunConfig, available: int | None) -> int:
    """Units one evaluation query covers: ``data.heldout_blocks`` (one block per unit),
    refused below the site's minimum or (unless ``available`` is None) above what the
    site holds."""
    asked = cfg.data.heldout_blocks
    if asked < policy.eval_min_units:
        raise PolicyRefused(f"site {policy.site!r} refuses `data.heldout_blocks` = {asked}: "
                            f"a query must cover at least {policy.eval_min_units} held-out "
                            f"units ({policy.who('eval_min_units')})")
    if available is not None and available < asked:
        raise PolicyRefused(f"site {policy.site!r} refuses `data.heldout_blocks` = {asked}: "
                            "it holds fewer held-out units than the query asks for")
    return asked


def check_site_level_dp(policy: SitePolicy, cfg: RunConfig, ddp: DistributedDP | None) -> None:
    """Before a site trains for a round, check the site-level noise it would add against its
    floors; raises PolicyRefused naming the key. ``ddp`` is the mechanism the site would
    run (:meth:`DistributedDP.for_config`; None: no site-level noise at this site, as in a
    plain round, where any site-level noise would be the server's to add)."""
    floor, assumed = policy.min_user_noise_multiplier, policy.min_dishonest_fraction
    if floor and ddp is None:
        key, value = (("privacy.user_level", cfg.privacy.user_level)
                      if not cfg.privacy.user_level else ("secagg.mode", cfg.secagg.mode))
        raise PolicyRefused(
            f"site {policy.site!r} refuses `{key}` = {value}: it adds its own site-level "
            f"noise of at least z = {floor:g} under secure aggregation "
            f"(min_user_noise_multiplier, {policy.who('min_user_noise_multiplier')}) and "
            "does not leave that noise to the server")
    if ddp is None:
        return
    if ddp.noise_multiplier < floor:
        raise PolicyRefused(
            f"site {policy.site!r} refuses `privacy.user_noise_multiplier` = "
            f"{ddp.noise_multiplier:g}: below the site's floor {floor:g} "
            f"(min_user_noise_multiplier, {policy.who('min_user_noise_multiplier')}); the "
            "server may only propose stricter values")
    if floor and ddp.grid_inflation > MAX_GRID_INFLATION:
        raise PolicyRefused(
            f"site {policy.site!r} refuses the round's noise grid: {ddp.sites} participants "
            f"leave {ddp.clip_steps:g} grid steps for the clipping norm, and rounding onto "
            f"them raises the sensitivity {ddp.grid_inflation:.3g}-fold (at most "
            f"{MAX_GRID_INFLATION:g}); its noise z = {ddp.noise_multiplier:g} would fall "
            f"below the site's floor {floor:g} per unit of sensitivity "
            f"(min_user_noise_multiplier, {policy.who('min_user_noise_multiplier')})")
    if cfg.secagg.dishonest_fraction < assumed:
        raise PolicyRefused(
            f"site {policy.site!r} refuses `secagg.dishonest_fraction` = "
            f"{cfg.secagg.dishonest_fraction:g}: the site assumes at least {assumed:g} of "
            f"the sites collude (min_dishonest_fraction, "
            f"{policy.who('min_dishonest_fraction')}); fewer would lower its noise")


def check_reconstruction_threshold(policy: SitePolicy, threshold: int, neighbours: int) -> None:
    """Before a site masks anything under secure aggregation: with ``neighbours`` sites
    (itself included) holding shares at ``threshold``, a malicious server and k colluding
    sites can show the honest sites two survivor sets and rebuild both secrets of one
    site unless 2·t > n + k (docs/secagg.md, threat model). Raises PolicyRefused naming
    the smallest threshold this site's ``secagg_colluders`` accepts."""
    colluders = policy.secagg_colluders
    if 2 * threshold > neighbours + colluders:
        return
    needed = (neighbours + colluders) // 2 + 1
    advice = (f"it needs at least {needed}" if needed <= neighbours else
              f"no threshold over {neighbours} neighbours is enough")
    raise PolicyRefused(
        f"site {policy.site!r} refuses `secagg.reconstruction_threshold` = {threshold} over "
        f"{neighbours} neighbours: the server with {colluders} colluding site(s) "
        f"(secagg_colluders, {policy.who('secagg_colluders')}) could unmask this site's "
        f"update; {advice}")
