"""Client mod: a site clips its own update when the run has site-level DP on
(:mod:`fedcpt.privacy.user_level`)."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: apply Flower's ``fixedclipping_mod`` to training messages whose config
    carries a clipping norm (sent only when user-level DP is on); pass others through."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if (msg.metadata.message_type == MessageType.TRAIN and config is not None
            and KEY_CLIPPING_NORM in config):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
