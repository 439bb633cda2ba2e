"""A site's local training for one round: plain, or DP-SGD under its privacy ledger, with
the anchor (FedProx, L2-SP, EWC) the run asks for."""

from __future__ import annotations

import logging
import zlib

from flwr.app import ArrayRecord, Context, Message

from fedcpt.client.request import load_request, run_config
from fedcpt.client.site import open_ledger, policy_for, require_dp, resolve_site, site_blocks
from fedcpt.client.update_cache import (
    StoredUpdate,
    UpdateCache,
    reusable_update,
)
from fedcpt.config import RunConfig, SiteConfig
from fedcpt.core import protocol as p
from fedcpt.core.adapters import (
    adapter_state,
    arrays_digest,
    check_update,
    from_arrays,
    to_arrays,
)
from fedcpt.core.data import TokenBlocks
from fedcpt.core.model import AdaptedModel
from fedcpt.core.training import Anchor, TrainResult, train_adapter
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.dpsgd import train_adapter_dp
from fedcpt.privacy.plan import plan_run
from fedcpt.privacy.policy import SitePolicy, accept_proposal
from fedcpt.privacy.release import eval_reservation

log = logging.getLogger(__name__)


def train_update(msg: Message, context: Context,
                 ) -> tuple[ArrayRecord, dict[str, float], SiteConfig]:
    """The site's trained adapter and metrics (under DP, after the spend is recorded)."""
    cfg, node_config = run_config(msg), dict(context.node_config)
    site = resolve_site(cfg, node_config)
    policy = policy_for(cfg, site, node_config)  # refuses inputs it does not allow
    cfg, lm, server_round = load_request(msg, policy)
    blocks = site_blocks(site, cfg.model, cfg.data, policy)
    lr = cfg.lr_at(server_round)
    anchor = _anchor(cfg, lm, msg)
    require_dp(cfg, policy)
    if cfg.privacy.enabled:
        run_id = str(msg.content[p.CONFIG][p.RUN_ID])
        arrays, metrics = _train_private(cfg, lm, site, blocks, policy, lr, run_id,
                                         server_round, anchor, msg.content[p.ARRAYS])
        return arrays, metrics, site
    # Seed per (run, site, round): reproducible, different across sites and rounds.
    seed = zlib.crc32(f"{cfg.seed}/{site.name}/{server_round}".encode())
    result = train_adapter(lm, blocks.train, cfg.train, lr=lr, seed=seed, anchor=anchor)
    _log_result(site, server_round, result)
    metrics = {p.TRAIN_LOSS: result.mean_loss, p.NUM_EXAMPLES: result.examples,
               p.TRAIN_SECONDS: result.seconds}
    return to_arrays(adapter_state(lm.model)), metrics, site


def _log_result(site: SiteConfig, server_round: int, result: TrainResult) -> None:
    log.info("site %s round %d: loss %.4f, %d steps in %.1fs", site.name, server_round,
             result.mean_loss, result.steps, result.seconds)


def _train_private(cfg: RunConfig, lm: AdaptedModel, site: SiteConfig, blocks: TokenBlocks,
                   policy: SitePolicy, lr: float, run_id: str, server_round: int,
                   anchor: Anchor | None, request: ArrayRecord,
                   ) -> tuple[ArrayRecord, dict[str, float]]:
    """DP-SGD under the site's ledger lock: check the budget, train, store the update,
    record the spend durably — all before the update can leave the site. A round already
    paid for is resent from the store, not trained again (:mod:`~fedcpt.client.update_cache`).

    The training loss is computed on the protected records and is not released; neither is
    the training time (it depends on the realised Poisson batch sizes): it is sent as 0.
    """
    records = blocks.units  # the N of the unit-level guarantee
    terms = accept_proposal(policy, cfg, records)
    reserved = eval_reservation(policy, cfg.federation.rounds)
    with open_ledger(cfg, policy, terms).locked() as ledger:
        cache = UpdateCache.beside(ledger.path)
        digest = arrays_digest(request)
        update = reusable_update(ledger, cache, run_id, server_round, digest)
        if update is None:
            plan = plan_run(cfg.privacy, ledger, records=records,
                            batch_size=cfg.train.batch_size,
                            steps=cfg.federation.rounds * cfg.train.local_steps, run_id=run_id,
                            reserved=reserved)
            ledger.check_budget(plan.noise_multiplier, plan.sample_rate, cfg.train.local_steps)
            result = train_adapter_dp(lm, blocks.train, cfg.train, cfg.privacy, lr=lr,
                                      noise_multiplier=plan.noise_multiplier,
                                      sample_rate=plan.sample_rate, anchor=anchor,
                                      units=blocks.train_units)
            _log_result(site, server_round, result)
            update = StoredUpdate(
                run=run_id, round=server_round, request=digest,
                arrays=to_arrays(adapter_state(lm.model)),
                metrics={p.NUM_EXAMPLES: result.examples, p.TRAIN_SECONDS: 0.0},
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                steps=result.steps)
            cache.store(update)
            ledger.policy = policy.record()
            ledger.record(run_id, server_round, update.noise_multiplier, update.sample_rate,
                          update.steps)
        metrics = dict(update.metrics)
        metrics.update(zip(p.PRIVACY_METRICS, (
            ledger.epsilon(), ledger.epsilon("rdp"), ledger.delta, update.noise_multiplier,
            update.sample_rate, ledger.steps), strict=True))
    return update.arrays, metrics


def _anchor(cfg: RunConfig, lm: AdaptedModel, msg: Message) -> Anchor | None:
    """FedProx pulls toward the received global adapter, L2-SP toward the initial one, EWC
    toward the initial one weighted by the Fisher the server sent, the phase anchor toward
    the adapter the server says the phase began from. The pull does not read the site's
    data, so a server's choice of target cannot draw on it (and costs no ε)."""
    anchor = cfg.strategy.anchor
    if anchor == "none" or cfg.strategy.anchor_weight == 0:
        return None
    if anchor == "fedprox":
        target = msg.content[p.ARRAYS]
    elif anchor == "phase":
        target = _sent_record(msg, p.ANCHOR, anchor, lm)
    else:
        target = lm.initial_adapter
    weights = from_arrays(_sent_record(msg, p.FISHER, anchor, lm)) if anchor == "ewc" else None
    return Anchor(lm.model, from_arrays(target), cfg.strategy.anchor_weight, weights)


def _sent_record(msg: Message, key: str, anchor: str, lm: AdaptedModel) -> ArrayRecord:
    """The anchor's record the training message must carry, shaped as the adapter."""
    record = msg.content.array_records.get(key)
    if record is None:
        raise UpdateRejected(f"strategy.anchor is '{anchor}' but the training message "
                             f"carries no '{key}' record")
    check_update(record, lm.initial_adapter)
    return record

