"""What a server's message asks of a site, built once per message: the run configuration,
the site, its policy, and (on demand) its data and the model with the received adapter.

Every handler and step takes one :class:`SiteRequest`, so the site's context is resolved
once, and the release gate (:mod:`fedcpt.client.gate`) decides on the same policy the
handler acted on.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field

from flwr.app import Context, Message

from fedcpt.client.site import is_deployed, lora_rank, policy_for, resolve_site, site_blocks
from fedcpt.config import RunConfig, SiteConfig
from fedcpt.core import protocol as p
from fedcpt.core.adapters import load_adapter
from fedcpt.core.data import TokenBlocks
from fedcpt.core.model import AdaptedModel, load_adapted_model
from fedcpt.core.ranks import lora_at_rank, truncate
from fedcpt.privacy.policy import SitePolicy, check_inputs

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _config(text: str) -> RunConfig:
    return RunConfig.from_json(text)


def run_config(msg: Message) -> RunConfig:
    """The RunConfig every message carries (``config["run-config"]``, JSON; parsed once)."""
    return _config(str(msg.content[p.CONFIG][p.RUN_CONFIG]))


@dataclass
class SiteRequest:
    """One message as this site reads it (built by :func:`request_for`, once)."""

    msg: Message
    context: Context
    cfg: RunConfig
    node_config: dict
    site: SiteConfig
    policy: SitePolicy
    _lm: AdaptedModel | None = field(default=None, repr=False)

    @property
    def deployed(self) -> bool:
        return is_deployed(self.node_config)

    @property
    def run_id(self) -> str:
        return str(self.msg.content[p.CONFIG].get(p.RUN_ID, ""))

    @property
    def server_round(self) -> int:
        return int(self.msg.content[p.CONFIG].get(p.SERVER_ROUND, 0))

    @property
    def dp_sgd(self) -> bool:
        """Whether this site trains with DP-SGD for this message. A site whose policy
        requires DP (by default, one with a budget or a ledger) refuses a run without it
        (:func:`~fedcpt.client.site.require_dp`), so the server cannot switch it off."""
        return self.cfg.privacy.enabled

    def blocks(self) -> TokenBlocks:
        """The site's token blocks (cached per process)."""
        return site_blocks(self.site, self.cfg.model, self.cfg.data, self.policy)

    @property
    def rank(self) -> int:
        """The LoRA rank this site trains and evaluates at (its policy may cap it)."""
        return lora_rank(self.cfg, self.policy)

    def model(self) -> AdaptedModel:
        """The site's model at its rank with the message's adapter, truncated to that
        rank, loaded (once per message)."""
        if self._lm is None:
            check_inputs(self.policy, self.cfg.data, self.cfg.model)  # before it is opened
            rank = self.rank
            self._lm = load_adapted_model(self.cfg.model, lora_at_rank(self.cfg.lora, rank),
                                          self.cfg.seed)
            load_adapter(self._lm.model, truncate(self.msg.content[p.ARRAYS], rank))
        return self._lm


_requests: weakref.WeakKeyDictionary[Message, SiteRequest] = weakref.WeakKeyDictionary()


def request_for(msg: Message, context: Context) -> SiteRequest:
    """The message's request, resolved once however many steps ask for it."""
    request = _requests.get(msg)
    if request is None or request.context is not context:
        cfg, node_config = run_config(msg), dict(context.node_config)
        site = resolve_site(cfg, node_config)
        request = SiteRequest(msg, context, cfg, node_config, site,
                              policy_for(cfg, site, node_config))
        _requests[msg] = request
    return request
