"""A site's side of the SecAgg+ key-exchange stages, 1, 2, 4 and 5, of a training or
evaluation session (:mod:`fedcpt.privacy.secagg.site` holds the cryptography and every
check against a malicious server). They carry keys, shares and signatures only, signed
with this site's identity (:mod:`fedcpt.privacy.secagg.identity`). Stage 3, which trains
or evaluates, is :func:`fedcpt.client.model_handlers.secagg_masked` and
:func:`fedcpt.client.eval_step.masked`. A check that fails is a generic error reply
(:func:`fedcpt.client.gate.refuse`; the reason is in the site's log).

Nothing here loads torch or the site's model and data: Flower starts a ClientApp process
for every message, and these stages are four of the five of each session."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedcpt.client import gate
from fedcpt.core import protocol as p
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.gate import SECAGG_STAGE, Mode
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.context import TRAIN
from fedcpt.privacy.secagg.identity import SiteIdentity, identity_for
from fedcpt.privacy.secagg.site import STATE

log = logging.getLogger(__name__)


def _secagg_stage(msg: Message, context: Context,
                  stage: Callable[[ConfigRecord, SiteIdentity], ConfigRecord]) -> Message:
    node_config = dict(context.node_config)
    try:
        record = stage(msg.content.config_records[STATE], identity_for(node_config))
    except FedcptError as err:
        return gate.refuse(msg, node_config, err, p.UPDATE_REFUSED)
    return gate.release(msg, node_config, Mode(SECAGG_STAGE), RecordDict({STATE: record}))


def setup(msg: Message, context: Context, purpose: str = TRAIN) -> Message:
    """Stage 1 of the round's ``purpose`` session: fresh key pairs, signed; only the
    public halves leave."""
    return _secagg_stage(msg, context, lambda r, me: secagg_site.setup(
        context, msg.metadata.dst_node_id, r, me, purpose))


def share_keys(msg: Message, context: Context, purpose: str = TRAIN) -> Message:
    """Stage 2: check every neighbour's signed keys; shares of this site's secrets,
    encrypted for each neighbour."""
    return _secagg_stage(msg, context,
                         lambda r, me: secagg_site.share_keys(context, r, me, purpose))


def consistency(msg: Message, context: Context, purpose: str = TRAIN) -> Message:
    """Stage 4: sign the survivor set (once per session)."""
    return _secagg_stage(msg, context,
                         lambda r, me: secagg_site.consistency(context, r, me, purpose))


def unmask(msg: Message, context: Context, purpose: str = TRAIN) -> Message:
    """Stage 5: the shares that unmask the sum, only with enough signatures over the
    survivor set; then the session's secrets are deleted."""
    return _secagg_stage(msg, context,
                         lambda r, me: secagg_site.unmask(context, r, me, purpose))
