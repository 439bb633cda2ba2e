"""A site's evaluation of the received adapter, released plain (one reply per site) or
masked (stage 3 of the round's SecAgg+ evaluation session: the server learns only the
sum over sites, :mod:`fedcpt.privacy.secagg.eval_sum`). What either may carry is the
site's policy's (:mod:`fedcpt.privacy.release`)."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcpt.client.request import load_request, refusal, run_config
from fedcpt.client.site import open_ledger, policy_for, resolve_site, site_blocks
from fedcpt.config import SiteConfig
from fedcpt.core import protocol as p
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.data_drift import DataDriftRecord, drift_path
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.policy import SitePolicy, accept_proposal, check_reconstruction_threshold
from fedcpt.privacy.release import release_evaluation
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.context import EVALUATE
from fedcpt.privacy.secagg.eval_sum import encode_evaluation
from fedcpt.privacy.secagg.site import STATE

log = logging.getLogger(__name__)

# Base-model loss per (site, model, data, policy): the base never changes, so compute it
# (and, under a noised release, pay for it) once per process.
_base_losses: dict[tuple, dict] = {}


def site_evaluation(msg: Message, context: Context, secure: bool,
                    ) -> tuple[dict[str, float], SiteConfig, SitePolicy]:
    """The metrics this site's policy lets it release for the message's adapter (raises
    SiteRefused when it releases none, or none this way; ``secure``: also when the masked
    session's threshold fails the site's floor), the site and its policy."""
    cfg, node_config = run_config(msg), dict(context.node_config)
    site = resolve_site(cfg, node_config)
    policy = policy_for(cfg, site, node_config)  # refuses inputs it does not allow
    cfg, lm, _ = load_request(msg, policy)
    if secure:  # before anything is evaluated: a noised release is paid when computed
        check_reconstruction_threshold(policy, *secagg_site.reconstruction(context, EVALUATE))
    blocks = site_blocks(site, cfg.model, cfg.data, policy)
    ledger, drift = None, None
    if policy.eval_release == "noised" and policy.ledger_path:
        ledger = open_ledger(cfg, policy, accept_proposal(policy, cfg, blocks.units))
    if policy.eval_release != "nothing" and policy.ledger_path and not secure:
        # read (and checked) before a noised release spends anything; a masked evaluation
        # carries no drift (it would be this site's own value)
        drift = DataDriftRecord.open(drift_path(Path(policy.ledger_path).expanduser()),
                                     site.name)
    metrics = release_evaluation(
        cfg, lm, policy, blocks, run_id=str(msg.content[p.CONFIG].get(p.RUN_ID, "")),
        base_cache=_base_losses.setdefault((site, cfg.model, cfg.data, policy), {}),
        ledger=ledger, drift=drift, secure=secure)
    return metrics, site, policy


def plain(msg: Message, context: Context) -> Message:
    """One site's evaluation metrics in the clear (refused by a ``secagg`` site)."""
    try:
        metrics, site, _ = site_evaluation(msg, context, secure=False)
    except SiteRefused as err:
        return refusal(msg, err, p.BUDGET_EXHAUSTED)
    return Message(RecordDict({p.METRICS: MetricRecord(metrics),
                               p.SITE: ConfigRecord({"name": site.name})}), reply_to=msg)


def masked(msg: Message, context: Context) -> Message:
    """Stage 3 of the evaluation session: check that the adapter and config are those the
    session's context committed to, keep the inbound shares, evaluate, then send only the
    fixed-point vector (:func:`encode_evaluation`), masked."""
    try:
        secagg_site.receive_shares(context, msg.content.config_records[STATE],
                                   msg.content[p.ARRAYS], msg.content[p.CONFIG], EVALUATE)
        metrics, site, policy = site_evaluation(msg, context, secure=True)
        vector, clipped = encode_evaluation(metrics, policy.eval_loss_bound)
        masked_vector = secagg_site.mask(context, vector, EVALUATE)
    except SiteRefused as err:
        return refusal(msg, err, p.BUDGET_EXHAUSTED)
    except UpdateRejected as err:  # a secure aggregation check (a data or config problem
        return refusal(msg, err)   # is the mod's to report, as for a plain evaluation)
    if clipped:
        log.warning("site %s clipped %d of its evaluation statistics to their range "
                    "(loss ≤ %g, ECE ≤ 1) before summing", site.name, clipped,
                    policy.eval_loss_bound)
    log.info("site %s sent its evaluation masked, for the secure sum", site.name)
    return Message(RecordDict({p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(masked_vector)}),
                               p.SITE: ConfigRecord({"name": site.name})}), reply_to=msg)
