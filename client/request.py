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
from fedcpt.core.ranks import lora_at_rank, truncate

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _config(text: str) -> RunConfig:
    return RunConfig.from_json(text)


def run_config(msg: Message) -> RunConfig:
    """The RunConfig every message carries (``config["run-config"]``, JSON; parsed once)."""
    return _config(str(msg.content[p.CONFIG][p.RUN_CONFIG]))


def load_request(msg: Message, rank: int) -> tuple[RunConfig, AdaptedModel, int]:
    """The run config, the site's model at ``rank`` (its LoRA rank,
    :func:`~fedcpt.client.site.lora_rank`) with the message's adapter truncated to that
    rank loaded, and the round."""
    cfg = run_config(msg)
    lm = load_adapted_model(cfg.model, lora_at_rank(cfg.lora, rank), cfg.seed)
    load_adapter(lm.model, truncate(msg.content[p.ARRAYS], rank))
    return cfg, lm, int(msg.content[p.CONFIG][p.SERVER_ROUND])


def refusal(msg: Message, err: Exception, code: int = p.UPDATE_REFUSED) -> Message:
    """An error reply naming why the site refused (logged at WARNING)."""
    log.warning("%s", err)
    return Message(Error(code=code, reason=str(err)), reply_to=msg)
