"""What a server's message asks of a site: the run's configuration and the model with the
received global adapter loaded."""

from __future__ import annotations

import functools
import logging

from flwr.app import Error, Message

from fedcpt.config import RunConfig
from fedcpt.core import protocol as p
from fedcpt.core.adapters import load_adapter
from fedcpt.core.model import AdaptedModel, load_adapted_model
from fedcpt.privacy.policy import SitePolicy, check_inputs

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _config(text: str) -> RunConfig:
    return RunConfig.from_json(text)


def run_config(msg: Message) -> RunConfig:
    """The RunConfig every message carries (``config["run-config"]``, JSON; parsed once)."""
    return _config(str(msg.content[p.CONFIG][p.RUN_CONFIG]))


def load_request(msg: Message, policy: SitePolicy) -> tuple[RunConfig, AdaptedModel, int]:
    """The run config, the model with the message's adapter loaded, and the round; the
    model is opened only if the site's ``policy`` allows it (PolicyRefused otherwise)."""
    cfg = run_config(msg)
    check_inputs(policy, cfg.data, cfg.model)
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    load_adapter(lm.model, msg.content[p.ARRAYS])
    return cfg, lm, int(msg.content[p.CONFIG][p.SERVER_ROUND])


def refusal(msg: Message, err: Exception, code: int = p.UPDATE_REFUSED) -> Message:
    """An error reply naming why the site refused (logged at WARNING)."""
    log.warning("%s", err)
    return Message(Error(code=code, reason=str(err)), reply_to=msg)
