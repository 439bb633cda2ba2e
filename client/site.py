"""Which site this client is, and its data, loaded once per process."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fedcpt.config import DataConfig, ModelConfig, RunConfig, SiteConfig
from fedcpt.core.data import TokenBlocks, load_blocks
from fedcpt.core.model import load_tokenizer
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.ledger import LEDGER_SUFFIX, PrivacyLedger, SiteRefused
from fedcpt.privacy.plan import site_delta

log = logging.getLogger(__name__)

# node_config keys a deployed SuperNode sets with --node-config
SITE_NAME_KEY = "site-name"
DATA_PATH_KEY = "data-path"
LEDGER_PATH_KEY = "ledger-path"
BUDGET_KEY = "epsilon-budget"
REQUIRE_DP_KEY = "require-dp"
REQUIRE_SECAGG_KEY = "require-secagg"


def resolve_site(cfg: RunConfig, node_config: dict) -> SiteConfig:
    """A deployed site names its data in node_config; a simulated one is ``sites[partition-id]``."""
    if DATA_PATH_KEY in node_config:
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


@functools.lru_cache(maxsize=4)
def site_blocks(site: SiteConfig, model: ModelConfig, data: DataConfig) -> TokenBlocks:
    """Tokenised, packed blocks of one site's own data (cached per process)."""
    blocks = load_blocks(site.data, load_tokenizer(model), data, what=f"site {site.name!r}")
    log.info("site %s: %d train blocks, %d held-out blocks", site.name, len(blocks.train),
             len(blocks.heldout))
    return blocks


def open_ledger(cfg: RunConfig, site: SiteConfig, node_config: dict,
                records: int) -> PrivacyLedger:
    """The site's own privacy ledger: ``ledger-path`` at a deployed site, else
    ``<privacy.ledger_dir>/<site>.ledger.json``. A site's ``epsilon-budget`` node config
    is its budget; otherwise the run's, which can lower but never raise a stored one."""
    if LEDGER_PATH_KEY in node_config:
        path = Path(str(node_config[LEDGER_PATH_KEY]))
    elif cfg.privacy.ledger_dir:
        path = Path(cfg.privacy.ledger_dir) / f"{site.name}{LEDGER_SUFFIX}"
    else:
        raise ConfigError(f"DP is on but site {site.name!r} has no ledger location: set "
                          f"`{LEDGER_PATH_KEY}` in --node-config or privacy.ledger_dir")
    site_budget = node_config.get(BUDGET_KEY)
    return PrivacyLedger.open(
        path, site.name, delta=site_delta(cfg.privacy, records),
        target_epsilon=float(site_budget) if site_budget else cfg.privacy.target_epsilon,
        accountant=cfg.privacy.accountant, site_sets_budget=bool(site_budget))


def require_dp(cfg: RunConfig, node_config: dict) -> None:
    """A site with ``require-dp=true`` refuses any round that does not use DP-SGD."""
    if str(node_config.get(REQUIRE_DP_KEY, "")).lower() in ("1", "true") and \
            not cfg.privacy.enabled:
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
