"""Which site this client is, its privacy policy, and its data, loaded once per process."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fedcpt.client.node_keys import (
    DATA_PATH_KEY,
    LEDGER_PATH_KEY,
    REQUIRE_SECAGG_KEY,
    SITE_NAME_KEY,
)
from fedcpt.config import DataConfig, ModelConfig, RunConfig, SiteConfig
from fedcpt.core.data import TokenBlocks, heldout_by_hash, kept_by_hash, load_blocks
from fedcpt.core.model import load_tokenizer
from fedcpt.core.ranks import site_rank
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.heldout import HeldoutSplit, split_path
from fedcpt.privacy.ledger import PrivacyLedger, SiteRefused
from fedcpt.privacy.policy import RunTerms, SitePolicy, check_inputs, site_policy

log = logging.getLogger(__name__)


def resolve_site(cfg: RunConfig, node_config: dict) -> SiteConfig:
    """A deployed site names its data in node_config; a simulated one is ``sites[partition-id]``."""
    if is_deployed(node_config):
        name = str(node_config.get(SITE_NAME_KEY, "site"))
        paths = tuple(p for p in str(node_config[DATA_PATH_KEY]).split(",") if p)
        return SiteConfig(name=name, data=paths)
    if "partition-id" not in node_config:
        raise ConfigError(f"node_config needs `{DATA_PATH_KEY}` (and `{SITE_NAME_KEY}`) "
                          f"at a deployed site; got keys {sorted(node_config)}")
    index = int(node_config["partition-id"])
    if index >= len(cfg.sites):
        raise ConfigError(f"simulated node {index} has no site: the run defines "
                          f"{len(cfg.sites)} sites")
    return cfg.sites[index]


def is_deployed(node_config: dict) -> bool:
    return DATA_PATH_KEY in node_config


def policy_for(cfg: RunConfig, site: SiteConfig, node_config: dict) -> SitePolicy:
    """The privacy policy in force at ``site`` (its own node config when deployed), after
    checking that the run's data and model inputs are ones it allows: PolicyRefused before
    any data is read or any model opened (:func:`~fedcpt.privacy.policy.check_inputs`)."""
    policy = site_policy(cfg, site, node_config, deployed=is_deployed(node_config))
    check_inputs(policy, cfg.data, cfg.model)
    return policy


@functools.lru_cache(maxsize=4)
def site_blocks(site: SiteConfig, model: ModelConfig, data: DataConfig,
                policy: SitePolicy | None = None) -> TokenBlocks:
    """Tokenised blocks of one site's own data, packed within its privacy units, with the
    held-out split recorded beside its ledger and the cap (the share of training units in
    force) drawn by the same secret salt (cached per process). The run's inputs are checked
    against the policy before anything is read. Without a policy (a benchmark), every
    document is a unit and the split and cap are unsalted."""
    unit, salt, rule = "document", "", heldout_by_hash(data.heldout_fraction)
    share = data.train_share or 1.0
    if policy is not None:
        share = check_inputs(policy, data, model).train_share
        unit, rule = policy.unit, heldout_by_hash(policy.heldout_fraction)
        if policy.ledger_path:
            split = HeldoutSplit.open(split_path(Path(policy.ledger_path)), site.name, unit)
            rule, salt = split.rule(policy.heldout_fraction), split.salt
        else:
            log.info("site %s has no ledger location: its held-out split and cap are "
                     "unsalted and not recorded", site.name)
    blocks = load_blocks(site.data, load_tokenizer(model), data, what=f"site {site.name!r}",
                         unit=unit, heldout_rule=rule,
                         keep_rule=kept_by_hash(share, salt) if share < 1 else None)
    log.info("site %s: %d train blocks in %d units (share %g), %d held-out blocks in %d "
             "units (unit: %s)", site.name, len(blocks.train), blocks.units, share,
             len(blocks.heldout), blocks.heldout_unit_count, unit)
    return blocks


def lora_rank(cfg: RunConfig, policy: SitePolicy) -> int:
    """The LoRA rank the site trains and evaluates at: ``lora.r``, or its policy's
    ``max_lora_rank`` if lower (it then works on the global adapter truncated to it)."""
    rank = site_rank(cfg.lora.r, policy.max_lora_rank)
    if rank < cfg.lora.r:
        log.info("site %s: rank %d of the global adapter's %d (max_lora_rank, %s)",
                 policy.site, rank, cfg.lora.r, policy.who("max_lora_rank"))
    return rank


def open_ledger(cfg: RunConfig, policy: SitePolicy, terms: RunTerms) -> PrivacyLedger:
    """The site's own privacy ledger at the policy's ``ledger_path``, under the run's
    accepted terms (a δ and budget no looser than the site's; a stricter δ holds for this
    run only, the ledger keeps the site's)."""
    if not policy.ledger_path:
        raise ConfigError(f"DP is on but site {policy.site!r} has no ledger location: set "
                          f"`{LEDGER_PATH_KEY}` in its --node-config (or policy file); a "
                          "ledger the server places could be reset by the server")
    return PrivacyLedger.open(
        Path(policy.ledger_path).expanduser(), policy.site, delta=terms.own_delta,
        run_delta=terms.delta, target_epsilon=terms.epsilon_budget,
        accountant=cfg.privacy.accountant, site_sets_budget=True, unit=policy.unit,
        public_units=policy.public_units)


def require_dp(cfg: RunConfig, policy: SitePolicy) -> None:
    """A site with ``require-dp=true`` — by default, a deployed site that sets a budget or
    a ledger (:func:`~fedcpt.privacy.policy.site_policy`) — refuses any round that does not
    use DP-SGD: the server cannot switch it off."""
    if policy.require_dp and not cfg.privacy.enabled:
        raise SiteRefused("this site requires DP-SGD (require-dp) but the run "
                          "has privacy.enabled = false")


def require_secagg(cfg: RunConfig, node_config: dict, secure: bool) -> None:
    """Plain training is refused when the run or the site (``require-secagg=true``) asks
    for secure aggregation: it never silently turns off."""
    required = str(node_config.get(REQUIRE_SECAGG_KEY, "")).lower() in ("1", "true")
    if not secure and (required or cfg.secagg.mode == "on"):
        who = "this site (require-secagg)" if required else "the run (secagg.mode = on)"
        raise SiteRefused(f"{who} requires secure aggregation, but the server sent a "
                          "plain training message")
