"""Distributed DP under secure aggregation: the sites add the discrete Gaussian noise, and
the unmasked sum carries what the plan says, even with only the survivors' noise."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord
from secagg_grid import SiteGrid

from fedcpt.config import (
    FederationConfig,
    PrivacyConfig,
    RunConfig,
    SecAggConfig,
    SiteConfig,
    load_config,
)
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.accounting import epsilon as opacus_epsilon
from fedcpt.privacy.secagg.ddp import DistributedDP, discrete_gaussian
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED
from fedcpt.server.round_loop import Federation, request, train_attempt
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg

NODES = (101, 202, 303, 404, 505)
SHAPES = {"a.lora_A.weight": (8, 64), "a.lora_B.weight": (64, 8), "b.lora_A.weight": (8, 64)}
CLIP, Z = 0.5, 1.3


pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here


def _config(dishonest: float = 0.0) -> RunConfig:
    return RunConfig(
        sites=tuple(SiteConfig(name=f"s{i}", data=("unused",)) for i in range(5)),
        federation=FederationConfig(max_update_norm=2.0),
        privacy=PrivacyConfig(user_level=True, user_clipping_norm=CLIP, user_noise_multiplier=Z),
        secagg=SecAggConfig(mode="on", dishonest_fraction=dishonest))


def _zero_round(cfg: RunConfig, dropped: set[int]) -> tuple[np.ndarray, int]:
    """One round in which every site's update is exactly the global adapter: the unmasked
    mean is the noise alone. Returns that noise (flattened) and the total weight."""
    reference = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    updates = {n: (reference, 24) for n in NODES}
    grid = SiteGrid(updates, drop={MASKED: dropped}, cfg=cfg)
    max_weight = cfg.train.local_steps * cfg.train.batch_size
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, sites_per_round=5, round_timeout_s=5.0))
    fed = Federation(grid=grid, cfg=cfg, recorder=None, lm=None, general=None,
                     aggregator=SecAggFedAvg(cfg=cfg, max_examples=max_weight),
                     config=ConfigRecord(), rng=random.Random(0))
    arrays = train_attempt(fed, 1, reference, request(reference, ConfigRecord(), 1),
                           None).aggregate
    noise = np.concatenate([arrays[k].numpy().ravel().astype(np.float64) for k in SHAPES])
    return noise, 24 * (5 - len(dropped))


def _plan(cfg: RunConfig) -> DistributedDP:
    params = SecAggParams.for_round(cfg, 5)
    return DistributedDP.for_config(cfg, params.threshold, 5,
                                    sum(math.prod(s) for s in SHAPES.values()))


@pytest.mark.parametrize("dropped", [set(), {NODES[1], NODES[3]}])
def test_noise_in_the_unmasked_sum_matches_the_plan(dropped):
    cfg = _config()
    plan = _plan(cfg)
    noise, weight = _zero_round(cfg, dropped)
    max_weight = cfg.train.local_steps * cfg.train.batch_size
    # the mean is Σ noise · γ · max_weight / Σ weight; each survivor added σ_site (steps)
    survivors = 5 - len(dropped)
    expected = math.sqrt(survivors) * plan.site_sigma * plan.granularity * max_weight / weight
    measured = noise.std()
    assert measured == pytest.approx(expected, rel=0.08)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    # the sum of the survivors' noise alone has std ≥ z·C: here 3 survivors = the plan's
    # honest count, so it is exactly z·C
    sum_std = measured * weight / max_weight
    assert sum_std >= 0.92 * Z * CLIP
    if survivors == plan.honest:
        assert sum_std == pytest.approx(Z * CLIP, rel=0.08)


def test_dishonest_sites_are_not_counted_on_for_noise():
    honest, wary = _plan(_config()), _plan(_config(dishonest=0.2))  # 1 of 5 may collude
    assert (honest.honest, wary.honest) == (3, 2)
    # each site adds more noise, so that the 2 honest ones alone reach z·C
    total = wary.site_sigma * wary.granularity * math.sqrt(wary.honest)
    assert total == pytest.approx(Z * CLIP, rel=1e-6)
    with pytest.raises(ConfigError, match="dishonest_fraction"):
        _config(dishonest=0.6)


def test_reported_epsilon_matches_an_independent_gaussian_accountant():
    plan = _plan(_config())
    rounds, delta = 20, 1e-5
    # the sum's noise: honest × σ_site² in grid steps, against the enforced sensitivity Δ₂;
    # with σ_site this large the discrete terms (τ) vanish and DDG is the Gaussian mechanism
    z_effective = math.sqrt(plan.honest) * plan.site_sigma / plan.l2_bound
    accountant = RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z_effective), rounds)
    assert plan.epsilon(rounds, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    # ... and Opacus's RDP accountant (another orders grid) agrees, and the rounding makes
    # it no smaller than the central DP-FedAvg guarantee at z
    assert plan.epsilon(rounds, delta) == pytest.approx(
        opacus_epsilon([(z_effective, 1.0, rounds)], delta, "rdp"), rel=0.02)
    assert plan.epsilon(rounds, delta) >= opacus_epsilon([(Z, 1.0, rounds)], delta, "rdp") * 0.99
    assert z_effective <= Z


def test_discrete_gaussian_sampler_has_the_planned_variance():
    rng = np.random.default_rng(0)
    for sigma in (0.8, 3.0, 1e6):
        x = discrete_gaussian(rng, sigma, 200_000)
        assert x.dtype == np.int64
        assert x.std() == pytest.approx(sigma, rel=0.02)
        assert abs(x.mean()) < 5 * sigma / math.sqrt(x.size)


def test_user_level_dp_now_runs_with_secagg(sites_config):
    cfg = load_config("smoke", config_file=sites_config, overrides=[
        "secagg.mode=on", "federation.max_update_norm=5", "privacy.user_level=true"])
    assert cfg.privacy.user_level and cfg.secagg.enabled
    with pytest.raises(ConfigError, match="secagg.dishonest_fraction"):
        load_config("smoke", config_file=sites_config, overrides=[
            "secagg.mode=on", "federation.max_update_norm=5", "privacy.user_level=true",
            "secagg.dishonest_fraction=1"])
