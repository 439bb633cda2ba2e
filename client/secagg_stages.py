"""A site's side of the five SecAgg+ stages (:mod:`fedcpt.privacy.secagg.site` holds the
cryptography and every check against a malicious server). Stages 1, 2, 4 and 5 carry
keys, shares and signatures only, signed with this site's identity
(:mod:`fedcpt.privacy.secagg.identity`); stage 3 trains as a plain round does, checks the
update here (the server will only see the sum), then sends it quantised and masked — with
site-level DP on, clipped and noised here first (:mod:`fedcpt.privacy.secagg.ddp`). A
check that fails is an error reply naming it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcpt.client.attest import attestation_record
from fedcpt.client.request import refusal, run_config
from fedcpt.client.site import policy_for, resolve_site
from fedcpt.client.train_step import train_update
from fedcpt.core import protocol as p
from fedcpt.core.adapters import check_update, update_norm
from fedcpt.exceptions import FedcptError, UpdateRejected
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.policy import check_reconstruction_threshold, check_site_level_dp
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.context import TRAIN
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.encoding import encode, vector_length
from fedcpt.privacy.secagg.identity import SiteIdentity, identity_for
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.site import STATE

log = logging.getLogger(__name__)


def _secagg_stage(msg: Message, context: Context,
                  stage: Callable[[ConfigRecord, SiteIdentity], ConfigRecord]) -> Message:
    try:
        record = stage(msg.content.config_records[STATE],
                       identity_for(dict(context.node_config)))
    except FedcptError as err:
        return refusal(msg, err)
    return Message(RecordDict({STATE: record}), reply_to=msg)


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


def masked(msg: Message, context: Context) -> Message:
    """Stage 3: check that the adapter and config are those the round committed to and
    that the threshold and the site-level noise meet this site's floors (its policy),
    train, check the update against ``federation.max_update_norm``, then send it quantised
    (noised, under site-level DP) and masked."""
    try:
        secagg_site.receive_shares(context, msg.content.config_records[STATE],
                                   msg.content[p.ARRAYS], msg.content[p.CONFIG])
        cfg, reference = run_config(msg), msg.content[p.ARRAYS]
        state = context.state.config_records[STATE]
        params = SecAggParams.from_record(state)
        ddp = DistributedDP.for_config(cfg, params.threshold, len(state["participants"]),
                                       vector_length(reference) - 1)
        node_config = dict(context.node_config)  # the site's floors, before anything trains
        policy = policy_for(cfg, resolve_site(cfg, node_config), node_config)
        check_reconstruction_threshold(policy, *secagg_site.reconstruction(context))
        check_site_level_dp(policy, cfg, ddp)
        arrays, metrics, site = train_update(msg, context)
        check_update(arrays, reference)
        norm = update_norm(arrays, reference)
        if cfg.federation.max_update_norm and norm > cfg.federation.max_update_norm:
            log.warning("site %s: update norm %.3f exceeds the bound %s; not sent", site.name,
                        norm, cfg.federation.max_update_norm)
            # the norm itself stays here: it is a release about the site's data
            raise UpdateRejected(f"the update exceeds the norm bound "
                                 f"{cfg.federation.max_update_norm}; not sent")
        vector = encode(arrays, reference, int(metrics[p.NUM_EXAMPLES]), params, ddp)
        masked_vector = secagg_site.mask(context, vector)
        attestation = attestation_record(msg, node_config, site)
    except SiteRefused as err:
        return refusal(msg, err, p.BUDGET_EXHAUSTED)
    except FedcptError as err:
        return refusal(msg, err)
    content = RecordDict({p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(masked_vector)}),
                          p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": site.name, "unit": policy.unit})})
    if attestation is not None:
        content[p.ATTESTATION] = attestation
    return Message(content=content, reply_to=msg)


def consistency(msg: Message, context: Context, purpose: str = TRAIN) -> Message:
    """Stage 4: sign the survivor set (once per session)."""
    return _secagg_stage(msg, context,
                         lambda r, me: secagg_site.consistency(context, r, me, purpose))


def unmask(msg: Message, context: Context, purpose: str = TRAIN) -> Message:
    """Stage 5: the shares that unmask the sum, only with enough signatures over the
    survivor set; then the session's secrets are deleted."""
    return _secagg_stage(msg, context,
                         lambda r, me: secagg_site.unmask(context, r, me, purpose))
