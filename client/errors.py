"""Client mod: a problem the site can fix becomes one log line and an error reply.

Without it, a :class:`~fedcpt.exceptions.FedcptError` (a missing data path, a corrupt
ledger, a bad node config) ends the ClientApp process with a traceback and Flower's generic
"unhandled exception" exit; with it, the site's log says what to fix in one line, and the
server records the same sentence, prefixed with the site's name, as that site's failure for
the round while the federation goes on with the other sites. Refusals the app replies
with itself (a privacy budget, a secure aggregation check) get the site's name too.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedcpt.client.site import SITE_NAME_KEY
from fedcpt.core import protocol as p
from fedcpt.exceptions import FedcptError

log = logging.getLogger(__name__)


def report_site_errors(msg: Message, context: Context,
                       call_next: ClientAppCallable) -> Message:
    """Turn a FedcptError raised while handling ``msg`` into an error reply; at a deployed
    site, make every error reply name the site (the server knows it only by node id)."""
    named = SITE_NAME_KEY in context.node_config
    site = context.node_config.get(SITE_NAME_KEY) if named else \
        f"partition {context.node_config.get('partition-id', '?')}"
    try:
        reply = call_next(msg, context)
    except FedcptError as err:
        log.error("site %s cannot take part in this %s round: %s", site,
                  msg.metadata.message_type, err)
        return Message(Error(code=p.SITE_ERROR, reason=f"site {site}: {err}"), reply_to=msg)
    if named and reply.has_error() and not reply.error.reason.startswith("site "):
        return Message(Error(code=reply.error.code, reason=f"site {site}: {reply.error.reason}"),
                       reply_to=msg)
    return reply
