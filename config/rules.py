"""Checks that span sections of a :class:`~fedcpt.config.RunConfig`, and the one-line
``require`` every check uses: its message names the key, what was expected and what was
given."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedcpt.exceptions import ConfigError

if TYPE_CHECKING:
    from fedcpt.config.schema import RunConfig

# Fewest sites in one sum revealed by secure aggregation: with two, each site could
# subtract its own update from the sum and learn the other's.
MIN_SECAGG_SITES = 3
# Most sites in one secure evaluation sum: 255 × (2^24 − 1) < 2^32, so the sum of their
# 24-bit limbs (fedcpt.privacy.secagg.eval_sum) never wraps the uint32 modulus.
MAX_SECURE_EVAL_SITES = 255


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise ConfigError "`key` must be expected, got value" unless ``ok``."""
    if not ok:
        raise ConfigError(f"`{key}` must be {expected}, got {value!r}")


def check_run(cfg: RunConfig) -> None:
    """Every cross-section rule of a run, in the order a user would fix them."""
    require(len(cfg.sites) > 0, "sites", cfg.sites, "at least one [[sites]] entry")
    names = [s.name for s in cfg.sites]
    dupes = sorted({n for n in names if names.count(n) > 1})
    require(not dupes, "sites.name", dupes, "unique site names")
    _check_phases(cfg, names)
    trained = {src for site in cfg.sites for src in site.data}
    shared = sorted(trained & {s for k in cfg.data.general_kinds() for s in k.sources})
    require(not shared, "data.general_eval", shared, "sources no site trains on (general "
            "text a site trains on cannot show what the model forgot)")
    strategy = cfg.strategy
    if cfg.privacy.user_level and (strategy.rehearsal != "none" or strategy.delta_scaling
                                   or strategy.regression_guard
                                   or strategy.distillation != "none"
                                   or strategy.server_optimizer != "none"):
        raise ConfigError("privacy.user_level cannot be combined with strategy.rehearsal, "
                          "strategy.distillation, strategy.delta_scaling, "
                          "strategy.regression_guard or strategy.server_optimizer: they "
                          "change the aggregate before the site-level noise is added")
    if cfg.privacy.user_level and strategy.anchor in ("ewc", "phase"):
        raise ConfigError("privacy.user_level cannot be combined with strategy.anchor = "
                          f"\"{strategy.anchor}\": Flower's fixedclipping_mod accepts "
                          "training messages with one ArrayRecord only, and this anchor "
                          "sends a second (EWC's Fisher, the phase's starting adapter)")
    if strategy.anchor != "none":
        pull = cfg.train.lr * strategy.anchor_weight
        require(pull < 1, "strategy.anchor_weight", strategy.anchor_weight,
                f"small enough that train.lr × anchor_weight < 1 (it is {pull:g}: each "
                "step would erase or overshoot the update)")
    if cfg.privacy.enabled and cfg.privacy.optimizer == "sgd":
        require(cfg.train.weight_decay == 0, "train.weight_decay", cfg.train.weight_decay,
                "0 with privacy.optimizer = \"sgd\" (its step is scaled by the noise's "
                "std; a decay would be scaled with it)")
    if strategy.distill_teacher == "phase":
        require(len(cfg.phases) > 1 and strategy.distillation != "none",
                "strategy.distill_teacher", strategy.distill_teacher,
                "\"phase\" only with strategy.distillation and two or more [[phases]] (it "
                "distils toward the adapter each later phase began from)")
    for key in ("sites_per_round", "eval_sites_per_round", "min_sites"):
        value = getattr(cfg.federation, key)
        require(value <= len(cfg.sites), f"federation.{key}", value,
                f"at most the number of sites ({len(cfg.sites)})")
    if cfg.secagg.mode == "on":
        _check_secagg(cfg)


def _check_secagg(cfg: RunConfig) -> None:
    sec, n = cfg.secagg, cfg.sites_per_round
    require(cfg.federation.upload_dtype == "fp32", "federation.upload_dtype",
            cfg.federation.upload_dtype, "\"fp32\" under secure aggregation (the sites "
            "already send their updates quantised to secagg.quantization_range levels for "
            "masking; that is the compression)")
    require(n >= MIN_SECAGG_SITES, "federation.sites_per_round", n,
            f">= {MIN_SECAGG_SITES} under secure aggregation (with two, the sum reveals each "
            "update to the other site)")
    require(bool(sec.clipping_range or cfg.federation.max_update_norm),
            "federation.max_update_norm", cfg.federation.max_update_norm,
            "> 0 under secure aggregation (the sites enforce it before masking and it "
            "sets the quantisation range), or set secagg.clipping_range")
    shares = sec.num_shares or n
    require(shares <= n, "secagg.num_shares", shares,
            f"at most the sites sampled per round ({n})")
    require(shares == n or shares % 2 == 1, "secagg.num_shares", shares,
            f"odd when below the sites sampled per round ({n}): neighbours are taken "
            "symmetrically on both sides")
    threshold = sec.reconstruction_threshold or shares // 2 + 1
    require(shares / 2 < threshold <= shares, "secagg.reconstruction_threshold",
            threshold, f"a majority of num_shares ({shares}) and at most num_shares: with "
            "fewer, the server could rebuild both secrets of one site")
    require(n * sec.quantization_range < 2**32, "secagg.quantization_range",
            sec.quantization_range, f"below 2^32 / {n} sites (sums are taken mod 2^32)")
    n_eval = cfg.federation.eval_sites_per_round or len(cfg.sites)
    require(MIN_SECAGG_SITES <= n_eval <= MAX_SECURE_EVAL_SITES,
            "federation.eval_sites_per_round", n_eval,
            f"{MIN_SECAGG_SITES} to {MAX_SECURE_EVAL_SITES} under secure aggregation (the "
            "sites' evaluations are released only as their sum)")
    if cfg.privacy.user_level:  # the sites add the noise (distributed DP)
        fewest = max(threshold, MIN_SECAGG_SITES)
        honest = fewest - math.floor(sec.dishonest_fraction * n)
        require(honest >= 1, "secagg.dishonest_fraction", sec.dishonest_fraction,
                f"small enough to leave an honest site among the {fewest} a sum needs "
                f"({n} sites per round)")


def _check_phases(cfg: RunConfig, site_names: list[str]) -> None:
    if not cfg.phases:
        return
    names = [ph.name for ph in cfg.phases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    require(not dupes, "phases.name", dupes, "unique phase names")
    for ph in cfg.phases:
        unknown = [s for s in ph.sites if s not in site_names]
        require(not unknown, f"phases[{ph.name}].sites", list(ph.sites),
                f"names of [[sites]] ({', '.join(site_names)}); unknown: "
                f"{', '.join(unknown)}")
        require(len(set(ph.sites)) == len(ph.sites), f"phases[{ph.name}].sites",
                list(ph.sites), "names without repeats")
    total = sum(ph.rounds for ph in cfg.phases)
    require(cfg.federation.rounds == total, "federation.rounds", cfg.federation.rounds,
            f"the sum of the [[phases]] rounds ({total}); set each phase's rounds instead")
    smallest = min(len(ph.sites) for ph in cfg.phases)
    for key in ("sites_per_round", "min_sites"):
        value = getattr(cfg.federation, key)
        require(value <= smallest, f"federation.{key}", value,
                f"at most the sites of the smallest phase ({smallest})")
    require(cfg.federation.eval_sites_per_round == 0,
            "federation.eval_sites_per_round", cfg.federation.eval_sites_per_round,
            "0 with [[phases]] (every site is evaluated every round, for the loss "
            "matrix across phases)")
    if cfg.secagg.mode == "on":
        fewest = cfg.federation.sites_per_round or smallest
        require(fewest >= MIN_SECAGG_SITES, "phases.sites", smallest,
                f"at least {MIN_SECAGG_SITES} training sites in every phase under secure "
                "aggregation (with two, the sum reveals each update to the other site)")
