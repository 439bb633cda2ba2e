"""Client mod: a problem the site can fix becomes one log line and an error reply.

Without it, a :class:`~fedcpt.exceptions.FedcptError` (a missing data path, a corrupt
ledger, a bad node config) ends the ClientApp process with a traceback and Flower's generic
"unhandled exception" exit; with it, the site's log says what to fix in one line, and the
server records the same sentence, prefixed with the site's name, as that site's failure for
the round while the federation goes on with the other sites.
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
    """Turn a FedcptError raised while handling ``msg`` into an error reply."""
    try:
        return call_next(msg, context)
    except FedcptError as err:
        site = context.node_config.get(SITE_NAME_KEY) or \
            f"partition {context.node_config.get('partition-id', '?')}"
        log.error("site %s cannot take part in this %s round: %s", site,
                  msg.metadata.message_type, err)
        return Message(Error(code=p.SITE_ERROR, reason=f"site {site}: {err}"), reply_to=msg)
