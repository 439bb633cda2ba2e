"""User-level (site-level) DP: DP-FedAvg with client-side fixed clipping.

Each site's adapter update is clipped to ``user_clipping_norm`` at the site (Flower's
``fixedclipping_mod``, applied by :func:`fedcpt.client.clipping.clip_when_asked` when
:func:`clipping_config` asks); the aggregator clips it to C again and takes the
**unweighted** mean (:class:`~fedcpt.strategies.fedavg.AdapterFedAvg`:
a site's ``num-examples`` is its own claim, and any weight above 1/n would move the mean by
more than C/n); and the server's site-level DP protocol
(:mod:`fedcpt.server.protocols.site_dp`) adds Gaussian noise of std σ·C/n to the mean of the n
updates it actually averaged (:func:`add_site_noise`, with Flower's own noise helpers;
McMahan et al., 2018, https://arxiv.org/abs/1710.06963), before any server step, so every
step is post-processing. A site that is silent or rejected shrinks n and so raises the
noise; a round in which a sampled site answered with an error is not released. Under
secure aggregation the sites add the noise instead (:mod:`fedcpt.privacy.secagg.ddp`),
and the mean is unweighted there too. This protects a
whole site's contribution, not just one unit, and is reported separately from unit-level
ε, computed here with RDP and no sampling amplification (every released round counts as a
full Gaussian release), which can only over-report.
"""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_inplace,
    compute_stdv,
)

from fedcpt.config import PrivacyConfig
from fedcpt.privacy.accounting import epsilon

log = logging.getLogger(__name__)


def clipping_config(config: ConfigRecord, privacy: PrivacyConfig) -> ConfigRecord:
    """The training config with the clipping norm that turns on the sites' clipping."""
    return ConfigRecord({**dict(config), KEY_CLIPPING_NORM: privacy.user_clipping_norm})


def add_site_noise(arrays: ArrayRecord, privacy: PrivacyConfig,
                   n_averaged: int) -> ArrayRecord:
    """The unweighted mean of ``n_averaged`` clipped updates plus Gaussian noise σ·C/n."""
    ndarrays = arrays.to_numpy_ndarrays()
    std = compute_stdv(privacy.user_noise_multiplier, privacy.user_clipping_norm,
                       n_averaged)
    add_gaussian_noise_inplace(ndarrays, std)
    log.info("site-level DP: Gaussian noise with std %.4g added to the average", std)
    return ArrayRecord({k: Array(v) for k, v in zip(arrays.keys(), ndarrays, strict=True)})


def user_level_epsilon(privacy: PrivacyConfig, rounds: int) -> float:
    """Site-level ε after ``rounds`` noisy aggregations (RDP, no amplification)."""
    return epsilon([(privacy.user_noise_multiplier, 1.0, rounds)], privacy.user_delta, "rdp")
