"""One configuration vocabulary for simulations and deployments.

A run is described by :class:`RunConfig`, a tree of frozen dataclasses
(:mod:`~fedcpt.config.schema`) checked field by field and across sections
(:mod:`~fedcpt.config.rules`). Scenario files (``simulations/*.toml``), ``--config FILE``
and ``--set section.key=value`` overrides all load into it through :func:`load_config`
(:mod:`~fedcpt.config.loading`), which rejects unknown keys (suggesting the closest valid
one) and invalid values before any work starts. ``docs/configuration.md`` is generated
from the fields' ``help`` (:mod:`~fedcpt.config.reference`).
"""

from fedcpt.config.build import build
from fedcpt.config.loading import (
    SCENARIO_DIR,
    load_config,
    parse_overrides,
    read_scenario,
    read_toml,
    scenario_names,
)
from fedcpt.config.rules import MAX_SECURE_EVAL_SITES, MIN_SECAGG_SITES
from fedcpt.config.schema import (
    DataConfig,
    FederationConfig,
    GeneralSet,
    LoraSettings,
    ModelConfig,
    MonitorConfig,
    Phase,
    PhaseConfig,
    PrivacyConfig,
    ReportConfig,
    RunConfig,
    SecAggConfig,
    SimulationConfig,
    SiteConfig,
    StrategyConfig,
    TrainConfig,
)
from fedcpt.config.site_policy import EVAL_RELEASES, SitePolicySettings
from fedcpt.config.tracking_section import TrackingConfig

__all__ = [
    "EVAL_RELEASES",
    "MAX_SECURE_EVAL_SITES",
    "MIN_SECAGG_SITES",
    "SCENARIO_DIR",
    "DataConfig",
    "FederationConfig",
    "GeneralSet",
    "LoraSettings",
    "ModelConfig",
    "MonitorConfig",
    "Phase",
    "PhaseConfig",
    "PrivacyConfig",
    "ReportConfig",
    "RunConfig",
    "SecAggConfig",
    "SimulationConfig",
    "SiteConfig",
    "SitePolicySettings",
    "StrategyConfig",
    "TrackingConfig",
    "TrainConfig",
    "build",
    "load_config",
    "parse_overrides",
    "read_scenario",
    "read_toml",
    "scenario_names",
]
