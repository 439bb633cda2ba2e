"""A site's evaluation of the received adapter, released plain (one reply per site) or
masked (stage 3 of the round's SecAgg+ evaluation session: the server learns only the
sum over sites, :mod:`fedcpt.privacy.secagg.eval_sum`). What either may carry is the
site's policy's (:mod:`fedcpt.privacy.release`)."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcpt.client import gate
from fedcpt.client.request import SiteRequest, request_for
from fedcpt.client.site import open_ledger
from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.data_drift import DataDriftRecord, drift_path
from fedcpt.privacy.gate import EVALUATE as EVALUATE_REPLY
from fedcpt.privacy.gate import MASKED_EVALUATE
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.policy import accept_proposal, check_reconstruction_threshold
from fedcpt.privacy.release import release_evaluation
from fedcpt.privacy.secagg import participation
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.context import EVALUATE
from fedcpt.privacy.secagg.eval_sum import encode_evaluation
from fedcpt.privacy.secagg.site import STATE, state_key

log = logging.getLogger(__name__)

# Base-model loss per (site, model, data, policy): the base never changes, so compute it
# (and, under a noised release, pay for it) once per process.
_base_losses: dict[tuple, dict] = {}


def site_evaluation(request: SiteRequest, secure: bool) -> dict[str, float]:
    """The metrics this site's policy lets it release for the message's adapter (raises
    SiteRefused when it releases none, or none this way; ``secure``: also when the masked
    session's threshold fails the site's floor, or the site already joined a sum for this
    adapter)."""
    cfg, site, policy, context = request.cfg, request.site, request.policy, request.context
    if secure:  # before anything is evaluated: a noised release is paid when computed
        check_reconstruction_threshold(policy, *secagg_site.reconstruction(context, EVALUATE))
        if policy.eval_release in ("plain", "secagg"):  # un-noised: one sum per adapter
            state = context.state.config_records[state_key(EVALUATE)]
            participation.claim(context, policy.ledger_path, participation.
                                evaluation_questions(str(state["adapter-digest"])))
    blocks = request.blocks()
    ledger, drift = None, None
    if policy.eval_release == "noised" and policy.ledger_path:
        ledger = open_ledger(cfg, policy, accept_proposal(policy, cfg, blocks.units))
    if policy.eval_release != "nothing" and policy.ledger_path and not secure:
        # read (and checked) before a noised release spends anything; a masked evaluation
        # carries no drift (it would be this site's own value)
        drift = DataDriftRecord.open(drift_path(Path(policy.ledger_path).expanduser()),
                                     site.name)
    return release_evaluation(
        cfg, request.model(), policy, blocks, run_id=request.run_id,
        base_cache=_base_losses.setdefault((site, cfg.model, cfg.data, policy), {}),
        ledger=ledger, drift=drift, secure=secure)


def plain(msg: Message, context: Context) -> Message:
    """One site's evaluation metrics in the clear (refused by a ``secagg`` site)."""
    try:
        request = request_for(msg, context)  # refuses inputs the site's policy does not allow
        metrics = site_evaluation(request, secure=False)
    except SiteRefused as err:
        return gate.refuse(msg, dict(context.node_config), err, p.BUDGET_EXHAUSTED)
    return gate.send(request, EVALUATE_REPLY, RecordDict({
        p.METRICS: MetricRecord(metrics), p.SITE: ConfigRecord({"name": request.site.name})}))


def masked(msg: Message, context: Context) -> Message:
    """Stage 3 of the evaluation session: check that the adapter and config are those the
    session's context committed to, keep the inbound shares, evaluate, then send only the
    fixed-point vector (:func:`encode_evaluation`), masked."""
    node_config = dict(context.node_config)
    try:
        secagg_site.receive_shares(context, msg.content.config_records[STATE],
                                   msg.content[p.ARRAYS], msg.content[p.CONFIG], EVALUATE)
        request = request_for(msg, context)
        metrics = site_evaluation(request, secure=True)
        vector, clipped = encode_evaluation(metrics, request.policy.eval_loss_bound)
        masked_vector = secagg_site.mask(context, vector, EVALUATE)
    except SiteRefused as err:
        return gate.refuse(msg, node_config, err, p.BUDGET_EXHAUSTED)
    except UpdateRejected as err:  # a secure aggregation check (a data or config problem
        return gate.refuse(msg, node_config, err, p.UPDATE_REFUSED)  # is the mod's)
    if clipped:
        log.warning("site %s clipped %d of its evaluation statistics to their range "
                    "(loss ≤ %g, ECE ≤ 1) before summing", request.site.name, clipped,
                    request.policy.eval_loss_bound)
    log.info("site %s sent its evaluation masked, for the secure sum", request.site.name)
    return gate.send(request, MASKED_EVALUATE, RecordDict({
        p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(masked_vector)}),
        p.SITE: ConfigRecord({"name": request.site.name})}))
