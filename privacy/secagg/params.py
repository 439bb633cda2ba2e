"""The SecAgg+ parameters of one round, agreed by the server and every site."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flwr.app import ConfigRecord

# MIN_SECAGG_SITES, the fewest updates in one revealed sum, is defined in fedcpt.config
# (the lowest layer that checks it) and imported from here by the protocol code.
from fedcpt.config import MIN_SECAGG_SITES, RunConfig
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.secagg.eval_sum import LIMB_BITS

# Sums are taken in uint32 arithmetic, which wraps modulo 2^32 at no cost.
MODULUS = 2**32


@dataclass(frozen=True)
class SecAggParams:
    """What a round of secure aggregation needs to be reproduced at every party."""

    num_shares: int
    """Neighbours of each site (itself included) that hold shares of its secrets."""
    threshold: int
    """Shares needed to rebuild one secret: a round survives num_shares − threshold
    dropouts among each site's neighbours."""
    clipping_range: float
    """Each weighted update coordinate is clipped to ±this before quantisation."""
    quantization_range: int
    """Quantisation levels over [−clipping_range, +clipping_range]."""
    max_weight: int
    """Largest ``num-examples`` a site may put in the sum (local steps × batch)."""

    @classmethod
    def for_round(cls, cfg: RunConfig, sampled: int) -> SecAggParams:
        """The parameters for a round that sampled ``sampled`` sites (config already
        validated by :class:`~fedcpt.config.RunConfig`)."""
        sec = cfg.secagg
        shares, threshold = _neighbourhood(cfg, sampled)
        params = cls(num_shares=shares, threshold=threshold,
                     clipping_range=sec.clipping_range or cfg.federation.max_update_norm,
                     quantization_range=sec.quantization_range,
                     max_weight=cfg.train.local_steps * cfg.train.batch_size)
        params.check(sampled)
        return params

    @classmethod
    def for_evaluation(cls, cfg: RunConfig, sampled: int) -> SecAggParams:
        """The parameters of a round's evaluation session over ``sampled`` sites: the
        neighbourhoods and threshold of a training round of that size; each coordinate
        is one 24-bit limb of :mod:`.eval_sum` and each site counts once, so
        :meth:`check` refuses a session whose limb sums could wrap 2^32. (A threshold
        set for the training rounds is raised to a majority if the session is larger.)"""
        shares, threshold = _neighbourhood(cfg, sampled)
        threshold = max(threshold, shares // 2 + 1)
        params = cls(num_shares=shares, threshold=threshold, clipping_range=1.0,
                     quantization_range=2**LIMB_BITS - 1, max_weight=1)
        params.check(sampled)
        return params

    def check(self, sites: int) -> None:
        """Raise ConfigError unless a round over ``sites`` sites is well defined."""
        problems = []
        if sites < MIN_SECAGG_SITES:
            problems.append(f"{sites} sites (need >= {MIN_SECAGG_SITES})")
        if not self.threshold * 2 > self.num_shares >= self.threshold >= 2:
            problems.append(f"threshold {self.threshold} is not a majority of num_shares "
                            f"{self.num_shares}")
        if self.num_shares < sites and self.num_shares % 2 == 0:
            problems.append(f"even num_shares {self.num_shares} below {sites} sites")
        if self.num_shares > sites:
            problems.append(f"num_shares {self.num_shares} above {sites} sites")
        if not self.clipping_range > 0:
            problems.append(f"clipping range {self.clipping_range}")
        if sites * self.quantization_range >= MODULUS or sites * self.max_weight >= MODULUS:
            problems.append(f"{sites} × quantization range {self.quantization_range} or "
                            f"max weight {self.max_weight} overflows 2^32")
        if self.max_weight < 1:
            problems.append(f"max weight {self.max_weight}")
        if problems:
            raise ConfigError("invalid secure aggregation parameters: " + "; ".join(problems))

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SecAggParams:
        try:
            return cls(num_shares=int(record["num_shares"]), threshold=int(record["threshold"]),
                       clipping_range=float(record["clipping_range"]),
                       quantization_range=int(record["quantization_range"]),
                       max_weight=int(record["max_weight"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"malformed secure aggregation parameters: {err}") from None


def default_threshold(shares: int) -> int:
    """The smallest threshold t with 2t > n + 1 over n = ``shares`` neighbours: the
    server with one colluding site cannot show the honest sites two survivor sets and
    rebuild both secrets of a victim (docs/secagg.md, threat model). Sites assume one
    colluder by default (``secagg-colluders``) and refuse a lower threshold."""
    return min((shares + 1) // 2 + 1, shares)


def _neighbourhood(cfg: RunConfig, sampled: int) -> tuple[int, int]:
    """num_shares and threshold for a session over ``sampled`` sites."""
    sec = cfg.secagg
    shares = min(sec.num_shares or sampled, sampled)
    if shares < sampled and shares % 2 == 0:
        shares -= 1  # fewer sites answered than configured: keep neighbourhoods symmetric
    return shares, min(sec.reconstruction_threshold or default_threshold(shares), shares)


def neighbours(nodes: list[int], node: int, num_shares: int) -> list[int]:
    """The sites that hold shares of ``node``'s secrets, itself included (sorted).

    SecAgg+ places the sites on a ring in node-id order and links each to the
    ``(num_shares − 1) / 2`` nearest on either side; with ``num_shares`` ≥ the number of
    sites every site is linked to every other (plain SecAgg)."""
    ring = sorted(nodes)
    if num_shares >= len(ring):
        return ring
    i, half = ring.index(node), (num_shares - 1) // 2
    return sorted({ring[(i + k) % len(ring)] for k in range(-half, half + 1)})
