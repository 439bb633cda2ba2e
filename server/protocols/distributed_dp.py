"""Site-level DP under SecAgg+: distributed DP (:mod:`fedcpt.privacy.secagg.ddp`). Each
site adds its share of a discrete Gaussian before masking, so the server adds nothing and
a failed site does not stop the release: the sites' noise is sized for the fewest
survivors the round may unmask."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from fedcpt.config import RunConfig
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.server.protocols.secagg import SecAggPlus
from fedcpt.server.protocols.site_dp import SiteLevelDP
from fedcpt.server.round_loop import Collected


class DistributedSiteDP(SiteLevelDP):
    """SecAgg+ with the sites' distributed discrete Gaussian."""

    inner: SecAggPlus

    def refusal(self, collected: Collected) -> str | None:
        return self.inner.refusal(collected)

    def postprocess(self, aggregate: ArrayRecord, n_updates: int) -> ArrayRecord:
        return self.inner.postprocess(aggregate, n_updates)  # the sites added the noise

    def summary(self, cfg: RunConfig, rounds: int, bytes_up: int) -> dict[str, Any]:
        """Site-level (ε, δ) of the distributed discrete Gaussian the sites added."""
        # a masked upload is the uint32 vector [weight, one value per adapter coordinate]
        ddp = DistributedDP.for_config(cfg, SecAggParams.for_round(cfg, cfg.sites_per_round)
                                       .threshold, cfg.sites_per_round, bytes_up // 4 - 1)
        assert ddp is not None  # chosen only under site-level DP and SecAgg+
        return {**self.inner.summary(cfg, rounds, bytes_up), "privacy_user_level": {
            "epsilon": ddp.epsilon(rounds, self.privacy.user_delta),
            "delta": self.privacy.user_delta,
            "noise_multiplier": self.privacy.user_noise_multiplier,
            "clipping_norm": self.privacy.user_clipping_norm, "rounds": rounds,
            "mechanism": "distributed discrete Gaussian (Kairouz et al. 2021), added by "
                         f"the sites; counts only {ddp.honest} honest survivors",
            "accountant": "rdp (DDG, no sampling amplification)"}}
