"""Distributed DP under secure aggregation: the sites add the discrete Gaussian noise, and
the unmasked sum carries what the plan says, even with only the survivors' noise."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import opendp.prelude as dp
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from flwr.app import Array, ArrayRecord, ConfigRecord
from scipy import stats
from secagg_grid import SiteGrid

from fedcpt.config import (
    FederationConfig,
    PrivacyConfig,
    RunConfig,
    SecAggConfig,
    SiteConfig,
    TrainConfig,
    load_config,
)
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.accounting import epsilon as opacus_epsilon
from fedcpt.privacy.secagg import ddp as ddp_module
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED
from fedcpt.server.protocols import round_protocol
from fedcpt.server.round_loop import request, train_attempt
from fedcpt.server.run import FederatedRun, ServerModel

NODES = (101, 202, 303, 404, 505)
SHAPES = {"a.lora_A.weight": (8, 64), "a.lora_B.weight": (64, 8), "b.lora_A.weight": (8, 64)}
CLIP, Z = 0.5, 1.3


pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here


def _config(dishonest: float = 0.0) -> RunConfig:
    return RunConfig(
        sites=tuple(SiteConfig(name=f"s{i}", data=("unused",)) for i in range(5)),
        federation=FederationConfig(max_update_norm=2.0),
        privacy=PrivacyConfig(user_level=True, user_clipping_norm=CLIP, user_noise_multiplier=Z),
        # a majority threshold (3 of 5): two sites may drop; collusion is not tested here
        secagg=SecAggConfig(mode="on", reconstruction_threshold=3,
                            dishonest_fraction=dishonest))


def _round(cfg: RunConfig, updates: dict[int, tuple[ArrayRecord, int]],
           dropped: set[int] = frozenset()) -> ArrayRecord:
    """One secure round over the five sites' ``(update, claimed num-examples)``, the sites
    in ``dropped`` silent after stage 2: the unmasked mean."""
    grid = SiteGrid(updates, drop={MASKED: dropped}, cfg=cfg)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, sites_per_round=5, round_timeout_s=5.0))
    fed = FederatedRun(grid=grid, cfg=cfg, protocol=round_protocol(cfg), recorder=None,
                       model=ServerModel(None), general=None, config=ConfigRecord(),
                       rng=random.Random(0))
    reference = _zeros()
    return train_attempt(fed, 1, reference, request(reference, ConfigRecord(), 1),
                         None).aggregate


def _zeros() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def _zero_round(cfg: RunConfig, dropped: set[int]) -> np.ndarray:
    """One round in which every site's update is exactly the global adapter: the unmasked
    mean is the noise alone. Returns that noise, flattened."""
    arrays = _round(cfg, {n: (_zeros(), 24) for n in NODES}, dropped)
    return np.concatenate([arrays[k].numpy().ravel().astype(np.float64) for k in SHAPES])


def _plan(cfg: RunConfig) -> DistributedDP:
    params = SecAggParams.for_round(cfg, 5)
    return DistributedDP.for_config(cfg, params.threshold, 5,
                                    sum(math.prod(s) for s in SHAPES.values()))


@pytest.mark.parametrize("dropped", [set(), {NODES[1], NODES[3]}])
def test_noise_in_the_unmasked_sum_matches_the_plan(dropped):
    cfg = _config()
    plan = _plan(cfg)
    noise = _zero_round(cfg, dropped)
    # the mean is Σ noise · γ / survivors; each survivor added σ_site (grid steps)
    survivors = 5 - len(dropped)
    expected = math.sqrt(survivors) * plan.site_sigma * plan.granularity / survivors
    measured = noise.std()
    assert measured == pytest.approx(expected, rel=0.08)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    # the sum of the survivors' noise alone has std ≥ z·C: here 3 survivors = the plan's
    # honest count, so it is exactly z·C
    sum_std = measured * survivors
    assert sum_std >= 0.92 * Z * CLIP
    if survivors == plan.honest:
        assert sum_std == pytest.approx(Z * CLIP, rel=0.08)


@pytest.mark.parametrize(("planted_at", "dropped"), [
    (NODES[0], set()), (NODES[1], set()), (NODES[0], {NODES[2], NODES[4]})])
def test_a_num_examples_claim_cannot_move_the_secure_mean_by_more_than_c_over_n(planted_at,
                                                                               dropped):
    """NODES[0] claims 1000× the others' num-examples (a curious site inflating its share,
    or four deflating theirs to single out NODES[0]). Only NODES[planted] sends a non-zero
    update, of norm 2·C (the site clips it to C); with nearly no noise the mean then shows
    that site's influence: C/n for the n sites unmasked, whatever anyone claimed."""
    cfg = dataclasses.replace(
        _config(), train=TrainConfig(local_steps=100, batch_size=10),
        privacy=PrivacyConfig(user_level=True, user_clipping_norm=CLIP,
                              user_noise_multiplier=1e-3))
    size = sum(math.prod(s) for s in SHAPES.values())
    planted = ArrayRecord({k: Array(np.full(s, 2 * CLIP / math.sqrt(size), np.float32))
                           for k, s in SHAPES.items()})
    updates = {n: (planted if n == planted_at else _zeros(), 1000 if n == NODES[0] else 1)
               for n in NODES}
    mean = _round(cfg, updates, dropped)
    flat = np.concatenate([mean[k].numpy().ravel().astype(np.float64) for k in SHAPES])
    along = float(flat.sum()) / math.sqrt(size)  # projection on the planted direction
    assert along == pytest.approx(CLIP / (5 - len(dropped)), rel=0.01)


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
    # the sum's noise: honest × σ_site² in grid steps, against the enforced sensitivity Δ₂
    # (as an integer, OpenDP's L2 distance); with σ_site this large the discrete terms (τ)
    # vanish and DDG is the Gaussian mechanism
    z_effective = math.sqrt(plan.honest) * plan.site_sigma / math.ceil(plan.l2_bound)
    accountant = RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z_effective), rounds)
    assert plan.epsilon(rounds, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    # ... and Opacus's RDP accountant (another orders grid) agrees, and the rounding makes
    # it no smaller than the central DP-FedAvg guarantee at z
    assert plan.epsilon(rounds, delta) == pytest.approx(
        opacus_epsilon([(z_effective, 1.0, rounds)], delta, "rdp"), rel=0.02)
    assert plan.epsilon(rounds, delta) >= opacus_epsilon([(Z, 1.0, rounds)], delta, "rdp") * 0.99
    assert z_effective <= Z


def _noise_plan(noise_multiplier: float, dimension: int) -> DistributedDP:
    return DistributedDP.for_round(clip=1.0, noise_multiplier=noise_multiplier, sites=5,
                                   threshold=3, dishonest_fraction=0.0, dimension=dimension)


# 10^5 draws: the sample variance's relative std is √(2/n) = 0.45%, so 2.5% is 5.6 of them
# (a false alarm once in 10^7 runs) while a 5% error in σ (10% in σ²) fails for certain
NOISE_DRAWS, VARIANCE_TOLERANCE = 100_000, 0.025


def test_site_noise_has_the_planned_variance_at_the_real_scale():
    """A zero update rounds to zero, so ``noised`` returns the noise alone."""
    plan = _noise_plan(Z, NOISE_DRAWS)
    assert plan.site_sigma > 1e6  # fedcpt's grid: σ_site is ~10^7 steps
    noise = plan.noised(np.zeros(NOISE_DRAWS))
    assert noise.dtype == np.int64
    assert noise.var() == pytest.approx(plan.site_sigma**2, rel=VARIANCE_TOLERANCE)
    assert abs(noise.mean()) < 5 * plan.site_sigma / math.sqrt(noise.size)


def test_site_noise_follows_the_exact_discrete_gaussian():
    """At a small σ (z = 10^-7: σ_site ≈ 12 steps) the histogram of the noise matches the
    discrete Gaussian's pmf ∝ exp(−x²/2σ²) on Z, by a χ² test at p > 10^-6."""
    plan = _noise_plan(1e-7, NOISE_DRAWS)
    sigma = plan.site_sigma
    assert 5 < sigma < 20
    noise = plan.noised(np.zeros(NOISE_DRAWS))
    support = np.arange(-40 * 4, 40 * 4 + 1)
    pmf = np.exp(-(support**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    inner = np.abs(support) <= 3 * sigma  # ≥ 5 expected draws in every bin
    cut = int(support[inner].max())
    observed = [np.sum(noise < -cut)] + [np.sum(noise == x) for x in support[inner]] + [
        np.sum(noise > cut)]
    expected = np.concatenate([[pmf[support < -cut].sum()], pmf[inner],
                               [pmf[support > cut].sum()]]) * noise.size
    assert min(expected) > 5
    assert stats.chisquare(observed, expected).pvalue > 1e-6
    assert noise.var() == pytest.approx(sigma**2, rel=VARIANCE_TOLERANCE)


def test_site_noise_does_not_come_from_pythons_or_numpys_randomness(monkeypatch):
    """An attacker who knows every seed Python and numpy see (here: os.urandom returns
    zeros, so the rounding's PCG64 is fixed) still cannot predict the noise: OpenDP draws
    it with its own CSPRNG. The float sampler it replaced is gone."""
    monkeypatch.setattr(ddp_module.os, "urandom", lambda n: bytes(n))
    plan = _noise_plan(Z, 1000)
    first, second = plan.noised(np.zeros(1000)), plan.noised(np.zeros(1000))
    assert np.count_nonzero(first != second) > 990
    assert not hasattr(ddp_module, "discrete_gaussian")


@pytest.mark.parametrize("noise_multiplier", [1e-7, 1e-3, 0.5, Z])
@pytest.mark.parametrize("dishonest", [0.0, 0.2])
def test_accounting_is_never_below_opendps_privacy_map(noise_multiplier, dishonest):
    """ε(α) per round ≥ α·ρ, for ρ OpenDP's zCDP map of one discrete Gaussian carrying the
    honest sites' summed noise, at the enforced sensitivity Δ₂ (rounded up: OpenDP's L2
    distance on integers is an integer)."""
    plan = DistributedDP.for_round(clip=CLIP, noise_multiplier=noise_multiplier, sites=5,
                                   threshold=3, dishonest_fraction=dishonest, dimension=1536)
    dp.enable_features("contrib")
    sum_noise = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64")),
                                   dp.l2_distance(T="i64"),
                                   scale=math.sqrt(plan.honest) * plan.site_sigma)
    rho = float(sum_noise.map(math.ceil(plan.l2_bound)))
    assert np.all(plan.rdp() >= np.array(DEFAULT_RDP_ORDERS) * rho)


def test_rounding_enforces_its_norm_bound():
    """An update just inside C whose grid coordinates all sit half-way between two steps
    (the rounding's widest spread) rounds to integer vectors of norm ≤ Δ₂, a bound below
    the one any rounding meets (so it is enforced, not implied), each coordinate to one of
    its two neighbouring steps."""
    plan = _noise_plan(Z, 4096)
    scaled = np.full(plan.dimension, math.floor(plan.clip_steps / math.sqrt(plan.dimension))
                     - 0.5)
    assert plan.l2_bound < plan.clip_steps + math.sqrt(plan.dimension)
    draws = np.array([plan.rounded(scaled * plan.granularity) for _ in range(50)])
    assert draws.dtype == np.int64
    assert np.linalg.norm(draws, axis=1).max() <= plan.l2_bound
    assert np.all((draws == np.floor(scaled)) | (draws == np.floor(scaled) + 1))
    assert 0.4 < (draws - np.floor(scaled)).mean() < 0.6  # both steps are taken


def test_user_level_dp_now_runs_with_secagg(sites_config):
    cfg = load_config("smoke", config_file=sites_config, overrides=[
        "secagg.mode=on", "federation.max_update_norm=5", "privacy.user_level=true"])
    assert cfg.privacy.user_level and cfg.secagg.enabled
    with pytest.raises(ConfigError, match="secagg.dishonest_fraction"):
        load_config("smoke", config_file=sites_config, overrides=[
            "secagg.mode=on", "federation.max_update_norm=5", "privacy.user_level=true",
            "secagg.dishonest_fraction=1"])
