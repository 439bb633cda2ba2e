"""Client mod: the last check before a reply leaves the site.

A :class:`~fedcpt.exceptions.FedcptError` (a missing data path, a corrupt ledger, a bad
node config) becomes a generic error reply through the release gate
(:func:`fedcpt.client.gate.refuse`): the site's log says what to fix in one line, the
server learns only that the site could not take part. Any other reply must have left
through the gate; one that did not is withheld (a bug, logged), and an error reply that
did not is made generic (its reason stays in the site's log).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedcpt.client import gate
from fedcpt.core import protocol as p
from fedcpt.exceptions import FedcptError

log = logging.getLogger(__name__)


def report_site_errors(msg: Message, context: Context,
                       call_next: ClientAppCallable) -> Message:
    """Turn a FedcptError raised while handling ``msg`` into a generic error reply, and let
    out only replies that passed the release gate."""
    node_config = dict(context.node_config)
    site = gate.site_label(node_config)
    try:
        reply = call_next(msg, context)
    except FedcptError as err:
        log.error("site %s cannot take part in this %s round: %s", site,
                  msg.metadata.message_type, err)
        return gate.error_reply(msg, node_config, p.SITE_ERROR)
    if gate.released(reply):
        return reply
    if reply.has_error():
        log.warning("site %s: error reply made generic: %s", site, reply.error.reason)
        return gate.error_reply(msg, node_config, reply.error.code)
    log.error("site %s: a %s reply did not pass the release gate; nothing is sent", site,
              msg.metadata.message_type)
    return gate.error_reply(msg, node_config, p.SITE_ERROR)
