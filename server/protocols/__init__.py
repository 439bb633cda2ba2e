"""The round protocols, and :func:`round_protocol`, which chooses the run's once."""

from __future__ import annotations

from fedcpt.config import RunConfig
from fedcpt.server.protocols.base import RoundProtocol
from fedcpt.server.protocols.distributed_dp import DistributedSiteDP
from fedcpt.server.protocols.fedavg import PlainFedAvg
from fedcpt.server.protocols.secagg import SecAggPlus
from fedcpt.server.protocols.site_dp import SiteLevelDP
from fedcpt.strategies.fedavg import AdapterFedAvg
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg


def round_protocol(cfg: RunConfig) -> RoundProtocol:
    """The run's mechanism: SecAgg+ when ``secagg`` is on, else plain FedAvg with the
    update-norm bound; wrapped in site-level DP when ``privacy.user_level`` (distributed DP
    under SecAgg+). Either aggregator weighs every site equally under site-level DP."""
    max_examples = cfg.train.local_steps * cfg.train.batch_size
    user_level = cfg.privacy.user_level
    if cfg.secagg.enabled:
        secure = SecAggPlus(SecAggFedAvg(cfg=cfg, max_examples=max_examples))
        return DistributedSiteDP(secure, cfg.privacy) if user_level else secure
    plain = PlainFedAvg(AdapterFedAvg(
        max_update_norm=cfg.federation.max_update_norm, max_examples=max_examples,
        site_clip=cfg.privacy.user_clipping_norm if user_level else 0.0,
        upload_dtype=cfg.federation.upload_dtype))
    return SiteLevelDP(plain, cfg.privacy) if user_level else plain
