"""Site-level DP (DP-FedAvg, :mod:`fedcpt.privacy.user_level`) as a wrapper around another
round protocol, as Flower's ``DifferentialPrivacyClientSideFixedClipping`` wraps a strategy.

The wrapper asks the sites to clip (the clipping norm in the request), refuses a round in
which a sampled site failed (the noise is sized for every sampled site's update, as
Flower's wrapper does) and adds Gaussian noise σ·C/n to the mean of the n updates averaged,
before any server step, so every step is post-processing. Under SecAgg+ the sites add the
noise instead: :class:`~fedcpt.server.protocols.distributed_dp.DistributedSiteDP`.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcpt.config import PrivacyConfig, RunConfig
from fedcpt.privacy.user_level import add_site_noise, clipping_config, user_level_epsilon
from fedcpt.runfolder.records import Summary
from fedcpt.server.protocols.base import Exchange, RoundProtocol, Sent
from fedcpt.server.round_loop import Collected
from fedcpt.strategies.base import SiteEvalReport


class SiteLevelDP(RoundProtocol):
    """``inner`` with site-level DP: clipping at the sites, the server's Gaussian noise."""

    section = "privacy"

    def __init__(self, inner: RoundProtocol, privacy: PrivacyConfig) -> None:
        self.inner = inner
        self.privacy = privacy
        self.aggregator = inner.aggregator

    def configure(self, config: ConfigRecord) -> ConfigRecord:
        return clipping_config(self.inner.configure(config), self.privacy)

    def send_training(self, ex: Exchange, content: RecordDict, nodes: list[int]) -> Sent:
        return self.inner.send_training(ex, content, nodes)

    def refusal(self, collected: Collected) -> str | None:
        if collected.errors:  # as Flower's DP wrapper: the noise is sized for every
            # sampled site's update
            return "site-level DP: a sampled site failed; the round is not released"
        return self.inner.refusal(collected)

    def aggregate(self, ex: Exchange, sent: Sent, collected: Collected,
                  reference: ArrayRecord, failures: list[str]) -> ArrayRecord | None:
        return self.inner.aggregate(ex, sent, collected, reference, failures)

    def postprocess(self, aggregate: ArrayRecord, n_updates: int) -> ArrayRecord:
        # Calibrated to the updates actually averaged: a silent or rejected site shrinks
        # n, and the noise on the mean (σ·C/n) grows with it.
        return add_site_noise(self.inner.postprocess(aggregate, n_updates), self.privacy,
                              n_updates)

    def evaluate(self, ex: Exchange, content: RecordDict,
                 nodes: list[int]) -> list[SiteEvalReport]:
        return self.inner.evaluate(ex, content, nodes)

    def summary(self, cfg: RunConfig, rounds: int, bytes_up: int) -> dict[str, Any]:
        """Site-level (ε, δ) after ``rounds`` noisy releases of the server's noise."""
        return {**self.inner.summary(cfg, rounds, bytes_up), "privacy_user_level": {
            "epsilon": user_level_epsilon(self.privacy, rounds),
            "delta": self.privacy.user_delta,
            "noise_multiplier": self.privacy.user_noise_multiplier,
            "clipping_norm": self.privacy.user_clipping_norm,
            "rounds": rounds,
            "accountant": "rdp (no sampling amplification)",
        }}

    def report_lines(self, summary: Summary) -> list[str]:
        u = summary.privacy_user_level
        assert u is not None  # filled by summary()
        who = (f"the sites added {u['mechanism']} noise (z = {u['noise_multiplier']}) "
               "before masking" if "mechanism" in u else
               f"the server added Gaussian noise (σ = {u['noise_multiplier']}) to the average")
        return [*self.inner.report_lines(summary),
                "", "## Site-level privacy (DP-FedAvg)", "",
                f"Each site's update was clipped to L2 norm {u['clipping_norm']} and "
                f"{who}: "
                f"site-level ε = **{u['epsilon']:.3f}** at δ = {u['delta']:g} after "
                f"{u['rounds']} rounds ({u['accountant']}). This is separate from, and "
                "does not combine with, the unit-level ε above."]

    def upload_form(self, cfg: RunConfig) -> str:
        return self.inner.upload_form(cfg)
