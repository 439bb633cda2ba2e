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
from fedcpt.config.rules import MIN_SECAGG_SITES
from fedcpt.config.schema import (
    DataConfig,
    FederationConfig,
    LoraSettings,
    ModelConfig,
    MonitorConfig,
    Phase,
    PhaseConfig,
    PrivacyConfig,
    RunConfig,
    SecAggConfig,
    SimulationConfig,
    SiteConfig,
    StrategyConfig,
    TrainConfig,
)

__all__ = [
    "MIN_SECAGG_SITES",
    "SCENARIO_DIR",
    "DataConfig",
    "FederationConfig",
    "LoraSettings",
    "ModelConfig",
    "MonitorConfig",
    "Phase",
    "PhaseConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecAggConfig",
    "SimulationConfig",
    "SiteConfig",
    "StrategyConfig",
    "TrainConfig",
    "build",
    "load_config",
    "parse_overrides",
    "read_scenario",
    "read_toml",
    "scenario_names",
]
