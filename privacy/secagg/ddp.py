"""Site-level DP without a trusted server: the distributed discrete Gaussian (DDG).

Kairouz, Liu & Steinke, ICML 2021, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation" (https://arxiv.org/abs/2102.06387). Each site
clips its update to L2 norm ``C``, scales it onto the integer grid (step ``γ``),
rounds it with conditional randomized rounding (the rounded norm is *enforced* to stay
below ``Δ₂``), and adds discrete Gaussian noise before masking. The server sees only the
sum, whose noise is the sum of the honest survivors' noise, and divides it by the number n
of sites it covers: the mean is unweighted (:mod:`.encoding`), so each site moves it by at
most C/n and its noise is at least z·C/n for the n actually aggregated.

Calibration is conservative: the noise must meet the guarantee with only ``honest``
summands, the fewest honest sites that can be in an unmasked sum (the sites refuse to
unmask fewer than ``max(threshold, 3)`` survivors, of which up to
``secagg.dishonest_fraction`` of the sampled sites may collude with the server and
subtract their own contributions). Extra noise from further sites is post-processing.

Noise: each site's vector of discrete Gaussian samples is drawn by OpenDP
(``make_gaussian`` on an ``i64`` vector domain under L2), exactly, with OpenDP's own
CSPRNG: no floating-point sampler touches the data (Mironov, CCS 2012).

Accounting: the RDP bound of Proposition 14 (Eq. 17) with the sensitivity of Theorem 1,
no amplification by sampling (the server chooses the sites), composed over rounds and
converted to (ε, δ) by ``dp_accounting``. Its Gaussian term is OpenDP's own zCDP bound ρ
for one discrete Gaussian of the sum's scale at the integer sensitivity ⌈Δ₂⌉, so ε is
never below what OpenDP's privacy map implies. No maintained library implements the
distributed bound (the τ terms for a sum of discrete Gaussians), so it is written here.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import opendp.prelude as dp
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

from fedcpt.config import RunConfig
from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.privacy.secagg.params import MIN_SECAGG_SITES, MODULUS

# One site's clipped update spans this many grid steps at most, with room left below
# 2^31 for the sum of all sampled sites and their noise (8 standard deviations).
_HEADROOM = 2**30
_BETA = math.exp(-0.5)  # conditional rounding's failure probability per try (the paper's)
_ROUNDING_TRIES = 100
dp.enable_features("contrib")  # OpenDP gates its measurement constructors behind this flag
MAX_GRID_INFLATION = 1.01
"""The most a site with a noise floor lets rounding onto the grid raise its sensitivity
(Δ₂ / C in grid steps). The grid coarsens as the participant count grows: fake
participant ids would otherwise shrink the noise per unit of sensitivity while z still
met the floor."""


@dataclass(frozen=True)
class DistributedDP:
    """The distributed discrete Gaussian of one round, as every party recomputes it."""

    clip: float
    """C: L2 bound on each site's update (``privacy.user_clipping_norm``)."""
    noise_multiplier: float
    """z: the honest survivors' noise in the sum has std ≥ z·C (``user_noise_multiplier``)."""
    sites: int
    """Sites sampled for the round."""
    honest: int
    """Fewest honest sites in any sum the sites agree to unmask."""
    dimension: int
    """Adapter coordinates."""

    @classmethod
    def for_round(cls, *, clip: float, noise_multiplier: float, sites: int, threshold: int,
                  dishonest_fraction: float, dimension: int) -> DistributedDP:
        fewest = max(threshold, MIN_SECAGG_SITES)
        honest = fewest - math.floor(dishonest_fraction * sites)
        if honest < 1:
            raise ConfigError(f"secagg.dishonest_fraction {dishonest_fraction} of {sites} "
                              f"sites leaves no honest site among the {fewest} that a sum "
                              "needs; lower it or raise the threshold")
        return cls(clip=clip, noise_multiplier=noise_multiplier, sites=sites, honest=honest,
                   dimension=dimension)

    @classmethod
    def for_config(cls, cfg: RunConfig, threshold: int, sites: int,
                   dimension: int) -> DistributedDP | None:
        """The round's mechanism when site-level DP runs under SecAgg, else None."""
        if not (cfg.privacy.user_level and cfg.secagg.enabled):
            return None
        return cls.for_round(clip=cfg.privacy.user_clipping_norm,
                             noise_multiplier=cfg.privacy.user_noise_multiplier, sites=sites,
                             threshold=threshold,
                             dishonest_fraction=cfg.secagg.dishonest_fraction,
                             dimension=dimension)

    @property
    def clip_steps(self) -> float:
        """C in grid steps: the sites' sum plus 8σ of noise stays below 2^31."""
        spread = self.sites + 8 * self.noise_multiplier * math.sqrt(self.sites / self.honest)
        return math.floor(_HEADROOM / spread)

    @property
    def granularity(self) -> float:
        """γ: the size of one grid step in adapter units."""
        return self.clip / self.clip_steps

    @property
    def site_sigma(self) -> float:
        """Each site's discrete Gaussian σ in grid steps: ``honest`` of them sum to z·C."""
        return self.noise_multiplier * self.clip_steps / math.sqrt(self.honest)

    @property
    def l2_bound(self) -> float:
        """Δ₂ in grid steps: conditional rounding keeps every rounded update within it
        (Theorem 1; the first term holds for any rounding, the second is enforced)."""
        c, d = self.clip_steps, self.dimension
        any_rounding = (c + math.sqrt(d)) ** 2
        conditional = c**2 + d / 4 + math.sqrt(2 * math.log(1 / _BETA)) * (c + math.sqrt(d) / 2)
        return math.sqrt(min(any_rounding, conditional))

    @property
    def grid_inflation(self) -> float:
        """Δ₂ / C in grid steps: how much rounding onto this grid raises the sensitivity
        the noise must cover (1 for an infinitely fine grid)."""
        return self.l2_bound / self.clip_steps

    def rdp(self, orders=DEFAULT_RDP_ORDERS) -> np.ndarray:
        """One round's RDP ε(α) (Proposition 14, Eq. 17, with ``honest`` summands). The
        Gaussian term Δ₂²/(2nσ²) is OpenDP's ρ for N_Z(0, nσ²) at sensitivity ⌈Δ₂⌉
        (OpenDP's L2 distance on integers is an integer; the bound is monotone in Δ₂)."""
        n, var, d = self.honest, self.site_sigma**2, self.dimension
        tau = 10 * sum(math.exp(-2 * math.pi**2 * var * k / (k + 1)) for k in range(1, n))
        rho = float(_vector_gaussian(math.sqrt(n) * self.site_sigma).map(
            math.ceil(self.l2_bound)))
        # a/2·(√(2ρ) + √d·τ)², expanded so that rounding never takes either bound below αρ
        cross = math.sqrt(2 * rho * d) * tau + d * tau**2 / 2
        return np.array([min(a * rho + tau * d, a * rho + a * cross) for a in orders])

    def epsilon(self, rounds: int, delta: float) -> float:
        """Site-level ε after ``rounds`` rounds, at ``delta``."""
        if rounds <= 0:
            return 0.0
        return float(compute_epsilon(DEFAULT_RDP_ORDERS, rounds * self.rdp(), delta)[0])

    def rounded(self, delta: np.ndarray) -> np.ndarray:
        """Clip one site's update to C, scale it onto the grid and round it with
        conditional randomized rounding: an int64 vector of L2 norm at most Δ₂."""
        # The rounding's coin flips need no CSPRNG: the guarantee holds for any rounding
        # outcome (Δ₂ bounds every accepted vector and the noise alone hides it); the
        # coins only keep the rounding unbiased.
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))
        norm = float(np.linalg.norm(delta))
        clipped = delta * min(1.0, self.clip / norm) if norm > 0 else delta
        scaled = clipped / self.granularity
        floor = np.floor(scaled)
        for _ in range(_ROUNDING_TRIES):
            rounded = floor + (rng.random(scaled.shape) < scaled - floor)
            if np.linalg.norm(rounded) <= self.l2_bound:
                return rounded.astype(np.int64)
        # the chance of this is below (1 - e^-0.5)^100 for any input
        raise UpdateRejected("conditional rounding did not meet its norm bound")

    def noised(self, delta: np.ndarray) -> np.ndarray:
        """One site's rounded update plus OpenDP's exact discrete Gaussian noise (std
        ``site_sigma``): the int64 grid vector that goes into the sum."""
        noised = _vector_gaussian(self.site_sigma)(self.rounded(delta).tolist())
        return np.asarray(noised, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _vector_gaussian(sigma: float) -> dp.Measurement:
    """OpenDP's exact discrete Gaussian N_Z(0, σ²) added to each coordinate of an integer
    vector (Canonne, Kamath & Steinke 2020), with its zCDP map under L2."""
    return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64")),
                              dp.l2_distance(T="i64"), scale=sigma)


def to_ring(vector: np.ndarray) -> np.ndarray:
    """int64 grid values → uint32 residues mod 2^32 (what is masked and summed)."""
    return np.mod(vector, MODULUS).astype(np.uint32)


def from_ring(total: np.ndarray) -> np.ndarray:
    """uint32 residues of a sum → the signed int64 sum (|sum| < 2^31 by construction)."""
    signed = total.astype(np.int64)
    signed[signed >= MODULUS // 2] -= MODULUS
    return signed
