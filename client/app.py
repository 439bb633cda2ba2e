"""Flower ClientApp: a data site trains the global LoRA adapter on its own text.

Every message carries the run configuration (``config["run-config"]``, JSON) so the
same app serves simulations and deployments; a deployed site names its data with
``--node-config 'site-name=… data-path=…'``. Only adapter tensors and scalar metrics
are sent back — never base weights or text. This module holds the handlers; training is
in :mod:`~fedcpt.client.train_step`, the SecAgg+ stages in
:mod:`~fedcpt.client.secagg_stages`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcpt.client import secagg_stages
from fedcpt.client.attest import attestation_record
from fedcpt.client.errors import report_site_errors
from fedcpt.client.request import load_request, refusal, run_config
from fedcpt.client.site import open_ledger, policy_for, require_secagg, resolve_site, site_blocks
from fedcpt.client.train_step import train_update
from fedcpt.core import protocol as p
from fedcpt.privacy.data_drift import DataDriftRecord, drift_path
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.policy import accept_proposal, check_site_level_dp
from fedcpt.privacy.release import release_evaluation
from fedcpt.privacy.user_level import clip_when_asked

log = logging.getLogger(__name__)

app = ClientApp(mods=[report_site_errors, clip_when_asked])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``train.local_steps`` steps and return it.

    A site may refuse (an error reply naming the reason): when the round would exceed its
    privacy budget, when it requires DP and the run has none, or when secure aggregation
    is required and this message is a plain one.
    """
    try:
        cfg, node_config = run_config(msg), dict(context.node_config)
        require_secagg(cfg, node_config, secure=False)
        # a site with a floor on site-level noise adds that noise itself, under SecAgg only
        policy = policy_for(cfg, resolve_site(cfg, node_config), node_config)
        check_site_level_dp(policy, cfg, None)
        arrays, metrics, site = train_update(msg, context)
    except SiteRefused as err:
        return refusal(msg, err, p.BUDGET_EXHAUSTED)
    content = RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": site.name, "unit": policy.unit})})
    attestation = attestation_record(msg, node_config, site)
    if attestation is not None:
        content[p.ATTESTATION] = attestation
    return Message(content=content, reply_to=msg)


# --- Secure aggregation (SecAgg+): the five stages of a round --------------------------
@app.train(p.SECAGG_SETUP)
def secagg_setup(msg: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for the round, signed; only the public halves leave."""
    return secagg_stages.setup(msg, context)


@app.train(p.SECAGG_SHARE_KEYS)
def secagg_share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: check the neighbours' signed keys; shares of this site's secrets,
    encrypted for each neighbour."""
    return secagg_stages.share_keys(msg, context)


@app.train(p.SECAGG_MASKED)
def secagg_masked(msg: Message, context: Context) -> Message:
    """Stage 3: train as in :func:`train`, check the update here (the server will only
    see the sum), then send it quantised and masked."""
    return secagg_stages.masked(msg, context)


@app.train(p.SECAGG_CONSISTENCY)
def secagg_consistency(msg: Message, context: Context) -> Message:
    """Stage 4: sign the survivor set (once per round)."""
    return secagg_stages.consistency(msg, context)


@app.train(p.SECAGG_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 5: the shares that unmask the sum, given enough signatures over the
    survivor set; then the round's secrets are deleted."""
    return secagg_stages.unmask(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which site this node is (the server trains only a phase's sites)."""
    cfg = run_config(msg)
    site = resolve_site(cfg, dict(context.node_config))
    return Message(content=RecordDict({p.SITE: ConfigRecord({"name": site.name})}),
                   reply_to=msg)


# Base-model loss per (site, model, data, policy): the base never changes, so compute it
# (and, under a noised release, pay for it) once per process.
_base_losses: dict[tuple, dict] = {}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out domain loss of the received adapter on this site's data (and of the base),
    released only as the site's policy allows (:mod:`fedcpt.privacy.release`), with the
    site's data drift when it keeps a record beside its ledger."""
    cfg, lm, _ = load_request(msg)
    node_config = dict(context.node_config)
    site = resolve_site(cfg, node_config)
    policy = policy_for(cfg, site, node_config)
    blocks = site_blocks(site, cfg.model, cfg.data, policy)
    try:
        ledger, drift = None, None
        if policy.eval_release == "noised" and policy.ledger_path:
            ledger = open_ledger(cfg, policy, accept_proposal(policy, cfg, blocks.units))
        if policy.eval_release != "nothing" and policy.ledger_path:
            # read (and checked) before a noised release spends anything
            drift = DataDriftRecord.open(drift_path(Path(policy.ledger_path).expanduser()),
                                         site.name)
        metrics = release_evaluation(
            cfg, lm, policy, blocks, run_id=str(msg.content[p.CONFIG].get(p.RUN_ID, "")),
            base_cache=_base_losses.setdefault((site, cfg.model, cfg.data, policy), {}),
            ledger=ledger, drift=drift)
    except SiteRefused as err:
        return refusal(msg, err, p.BUDGET_EXHAUSTED)
    content = RecordDict({p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
