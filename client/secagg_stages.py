"""A site's side of the four SecAgg+ stages (:mod:`fedcpt.privacy.secagg.site` holds the
cryptography). Stages 1, 2 and 4 carry keys and shares only; stage 3 trains as a plain
round does, checks the update here (the server will only see the sum), then sends it
quantised and masked. A check that fails is an error reply naming it."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcpt.client.request import refusal, run_config
from fedcpt.client.train_step import train_update
from fedcpt.core import protocol as p
from fedcpt.core.adapters import check_update, update_norm
from fedcpt.exceptions import FedcptError, UpdateRejected
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.encoding import encode
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.site import STATE


def _secagg_stage(msg: Message, stage: Callable[[ConfigRecord], ConfigRecord]) -> Message:
    try:
        record = stage(msg.content.config_records[STATE])
    except FedcptError as err:
        return refusal(msg, err)
    return Message(RecordDict({STATE: record}), reply_to=msg)


def setup(msg: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for the round; only the public halves leave."""
    return _secagg_stage(msg, lambda r: secagg_site.setup(context, msg.metadata.dst_node_id, r))


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: shares of this site's secrets, encrypted for each neighbour."""
    return _secagg_stage(msg, lambda r: secagg_site.share_keys(context, r))


def masked(msg: Message, context: Context) -> Message:
    """Stage 3: train, check the update against ``federation.max_update_norm``, then send
    it quantised and masked."""
    try:
        secagg_site.receive_shares(context, msg.content.config_records[STATE])
        arrays, metrics, site = train_update(msg, context)
        cfg, reference = run_config(msg), msg.content[p.ARRAYS]
        check_update(arrays, reference)
        norm = update_norm(arrays, reference)
        if cfg.federation.max_update_norm and norm > cfg.federation.max_update_norm:
            raise UpdateRejected(f"update norm {norm:.3f} exceeds the bound "
                                 f"{cfg.federation.max_update_norm}; not sent")
        params = SecAggParams.from_record(context.state.config_records[STATE])
        vector = encode(arrays, reference, int(metrics[p.NUM_EXAMPLES]), params)
        masked_vector = secagg_site.mask(context, vector)
    except SiteRefused as err:
        return refusal(msg, err, p.BUDGET_EXHAUSTED)
    except FedcptError as err:
        return refusal(msg, err)
    content = RecordDict({p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(masked_vector)}),
                          p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: the shares that unmask the sum; then the round's secrets are deleted."""
    return _secagg_stage(msg, lambda r: secagg_site.unmask(context, r))
