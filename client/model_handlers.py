"""The ClientApp handlers that open the site's model and data: plain training, stage 3 of
a SecAgg+ training session (train, then send the update masked) and the query. Evaluation
is :mod:`fedcpt.client.eval_step`; :mod:`fedcpt.client.app` registers them all."""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcpt.client import gate
from fedcpt.client.attest import attestation_record
from fedcpt.client.request import SiteRequest, request_for
from fedcpt.client.site import require_secagg
from fedcpt.client.train_step import train_update
from fedcpt.core import protocol as p
from fedcpt.core.adapters import check_update, update_norm
from fedcpt.exceptions import FedcptError, UpdateRejected
from fedcpt.privacy.gate import MASKED_TRAIN, QUERY, TRAIN
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.policy import check_reconstruction_threshold, check_site_level_dp
from fedcpt.privacy.secagg import participation, site_level_record
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.ddp import DistributedDP
from fedcpt.privacy.secagg.encoding import encode, vector_length
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.site import STATE

log = logging.getLogger(__name__)


def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``train.local_steps`` steps and return it.

    A site may refuse (a generic error reply; the reason in its own log): when the round
    would exceed its privacy budget, when it requires DP and the run has none, or when
    secure aggregation is required and this message is a plain one.
    """
    try:
        request = request_for(msg, context)  # refuses inputs the site's policy does not allow
        require_secagg(request.cfg, request.node_config, secure=False)
        # a site with a floor on site-level noise adds that noise itself, under SecAgg only
        check_site_level_dp(request.policy, request.cfg, None)
        arrays, metrics = train_update(request)
    except SiteRefused as err:
        return gate.refuse(msg, dict(context.node_config), err, p.BUDGET_EXHAUSTED)
    content = RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": request.site.name,
                                                "unit": request.policy.unit})})
    attestation = attestation_record(request)
    if attestation is not None:
        content[p.ATTESTATION] = attestation
    return gate.send(request, TRAIN, content)


def secagg_masked(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 3 of a training session: check that the adapter and config are those
    the round committed to, that the threshold and the site-level noise meet this site's
    floors (its policy) and that this site has not yet sent an update for this run, round
    or adapter (:mod:`~fedcpt.privacy.secagg.participation`); train, check the update
    against ``federation.max_update_norm``, then send it quantised (noised, under
    site-level DP, :mod:`~fedcpt.privacy.secagg.ddp`) and masked. Under DP nothing about
    the training but the masked update leaves."""
    node_config = dict(context.node_config)
    try:
        secagg_site.receive_shares(context, msg.content.config_records[STATE],
                                   msg.content[p.ARRAYS], msg.content[p.CONFIG])
        request = request_for(msg, context)
        cfg, reference = request.cfg, msg.content[p.ARRAYS]
        state = context.state.config_records[STATE]
        params = SecAggParams.from_record(state)
        ddp = DistributedDP.for_config(cfg, params.threshold, len(state["participants"]),
                                       vector_length(reference) - 1)
        policy = request.policy  # the site's floors, before anything trains
        check_reconstruction_threshold(policy, *secagg_site.reconstruction(context))
        check_site_level_dp(policy, cfg, ddp)
        if ddp is not None:  # the site's cap over every run's site-level releases
            site_level_record.check_budget(policy, request.run_id, request.server_round, ddp,
                                           cfg.privacy.user_delta)
        bound = cfg.federation.max_update_norm
        if ddp is not None and bound and ddp.clip > bound:
            # decided on public values: the update is clipped to C before it is noised,
            # so a bound below C is all a refusal after training could reveal
            raise UpdateRejected(f"the site-level clipping norm {ddp.clip:g} exceeds the "
                                 f"update norm bound {bound:g}; nothing is trained")
        participation.claim(context, policy.ledger_path, participation.training_questions(
            request.run_id, request.server_round, str(state["adapter-digest"]),
            fresh_noise=request.dp_sgd))
        arrays, metrics = train_update(request)
        check_update(arrays, reference)
        if ddp is None and bound:
            _check_norm(request, arrays, reference, bound)
        if ddp is not None:  # counted by the site, whatever run ids the server uses
            site_level_record.record_release(policy.ledger_path, request.run_id,
                                             request.server_round, ddp, cfg.privacy.user_delta)
        vector = encode(arrays, reference, int(metrics[p.NUM_EXAMPLES]), params, ddp)
        masked_vector = secagg_site.mask(context, vector)
        attestation = attestation_record(request)
    except SiteRefused as err:
        return gate.refuse(msg, node_config, err, p.BUDGET_EXHAUSTED)
    except FedcptError as err:
        return gate.refuse(msg, node_config, err, p.UPDATE_REFUSED)
    if ddp is not None:  # site-level noise: the loss and time would leave un-noised
        metrics = {k: v for k, v in metrics.items() if k != p.TRAIN_LOSS} | {
            p.TRAIN_SECONDS: 0.0}
    content = RecordDict({p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(masked_vector)}),
                          p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": request.site.name,
                                                "unit": policy.unit})})
    if attestation is not None:
        content[p.ATTESTATION] = attestation
    return gate.send(request, MASKED_TRAIN, content, site_dp=ddp is not None)


def _check_norm(request: SiteRequest, arrays: ArrayRecord, reference: ArrayRecord,
                bound: float) -> None:
    """Refuse an update above the norm bound. Without site-level noise: under DP-SGD the
    update is already paid for (the refusal is post-processing); without DP the site's
    update is released in the clear to the sum anyway, and the participation record
    answers each (run, round) once, so retries with other bounds learn nothing more."""
    norm = update_norm(arrays, reference)
    if norm > bound:
        # the norm itself stays here: it is a release about the site's data
        raise UpdateRejected(f"site {request.site.name}: update norm {norm:.3f} exceeds the "
                             f"bound {bound:g}; not sent")


def query(msg: Message, context: Context) -> Message:
    """Say which site this node is (the server trains only a phase's sites)."""
    try:
        request = request_for(msg, context)
    except SiteRefused as err:
        return gate.refuse(msg, dict(context.node_config), err, p.BUDGET_EXHAUSTED)
    return gate.send(request, QUERY, RecordDict({p.SITE: ConfigRecord(
        {"name": request.site.name})}))
