"""A site's local training for one round: plain, or DP-SGD under its privacy ledger, with
the anchor (FedProx, L2-SP, EWC) the run asks for."""

from __future__ import annotations

import logging
import zlib

from flwr.app import ArrayRecord, Message

from fedcpt.client.request import SiteRequest
from fedcpt.client.site import open_ledger, require_dp
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
from fedcpt.core.ranks import pad, truncate
from fedcpt.core.training import Anchor, TrainResult, train_adapter
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.dpsgd import train_adapter_dp
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.plan import plan_run
from fedcpt.privacy.policy import SitePolicy, accept_proposal
from fedcpt.privacy.release import eval_reservation

log = logging.getLogger(__name__)


def train_update(request: SiteRequest) -> tuple[ArrayRecord, dict[str, float]]:
    """The site's trained adapter in the global adapter's max-rank layout (a site of a lower
    rank leaves the other components as received) and its metrics (under DP, after the
    spend is recorded)."""
    cfg, msg, site, policy = request.cfg, request.msg, request.site, request.policy
    require_dp(cfg, policy)
    lm, server_round = request.model(), request.server_round
    blocks = request.blocks()
    lr = cfg.lr_at(server_round)
    anchor = _anchor(cfg, lm, msg, request.rank)
    if request.dp_sgd:
        return _train_private(cfg, lm, site, blocks, policy, lr, str(msg.content[p.CONFIG][
            p.RUN_ID]), server_round, anchor, msg.content[p.ARRAYS])
    # Seed per (run, site, round): reproducible, different across sites and rounds.
    seed = zlib.crc32(f"{cfg.seed}/{site.name}/{server_round}".encode())
    result = train_adapter(lm, blocks.train, cfg.train, lr=lr, seed=seed, anchor=anchor)
    _log_result(site, server_round, result)
    metrics = {p.TRAIN_LOSS: result.mean_loss, p.NUM_EXAMPLES: result.examples,
               p.TRAIN_SECONDS: result.seconds}
    return pad(to_arrays(adapter_state(lm.model)), msg.content[p.ARRAYS]), metrics


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
    Nor is the accounting: ε, δ, σ and q depend on the number of training units. Under
    the site's ``public-units`` σ and the budget refusal are planned from public values.
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
                            steps=cfg.training_rounds(site.name) * cfg.train.local_steps,
                            run_id=run_id,
                            reserved=reserved)
            public = plan.ledger_public_rate
            # under public-units the refusal is decided at public rates only: it depends on
            # the budget, δ, σ, the steps and batch, and public-units, never on N
            ledger.check_budget(plan.noise_multiplier, plan.sample_rate, cfg.train.local_steps,
                                public_sample_rate=public)
            result = train_adapter_dp(lm, blocks.train, cfg.train, cfg.privacy, lr=lr,
                                      noise_multiplier=plan.noise_multiplier,
                                      sample_rate=plan.sample_rate, anchor=anchor,
                                      units=blocks.train_units)
            _log_result(site, server_round, result)
            update = StoredUpdate(
                run=run_id, round=server_round, request=digest,
                arrays=pad(to_arrays(adapter_state(lm.model)), request),
                metrics={p.NUM_EXAMPLES: result.examples, p.TRAIN_SECONDS: 0.0},
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                steps=result.steps, public_sample_rate=public)
            cache.store(update)
            ledger.policy = policy.record()
            ledger.record(run_id, server_round, update.noise_multiplier, update.sample_rate,
                          update.steps, public_sample_rate=public)
        # ε, δ, σ and q depend on N (q = batch / N): they stay in the site's ledger and log
        log.info("site %s round %d: ledger ε=%.3f (RDP %.3f) at δ=%.3g after %d DP-SGD steps "
                 "(σ=%.4f, q=%.5f)", site.name, server_round, ledger.epsilon(),
                 ledger.epsilon("rdp"), ledger.delta, ledger.steps, update.noise_multiplier,
                 update.sample_rate)
    return update.arrays, dict(update.metrics)


def _anchor(cfg: RunConfig, lm: AdaptedModel, msg: Message, rank: int) -> Anchor | None:
    """FedProx pulls toward the received global adapter, L2-SP toward the initial one, EWC
    toward the initial one weighted by the Fisher the server sent, the phase anchor toward
    the adapter the server says the phase began from (each truncated to the site's
    ``rank``). The pull does not read the site's data, so a server's choice of target
    cannot draw on it (and costs no ε)."""
    anchor = cfg.strategy.anchor
    if anchor == "none" or cfg.strategy.anchor_weight == 0:
        return None
    if anchor in ("l2sp", "ewc") and rank < cfg.lora.r:
        # The initial adapter's first components at rank r are not a rank-r model's own
        # initial adapter (peft draws A at each shape from one random stream).
        raise SiteRefused(f"strategy.anchor = \"{anchor}\" pulls toward the initial adapter, "
                          f"which this site, at rank {rank} of {cfg.lora.r} (max_lora_rank), "
                          "does not hold; use \"fedprox\" or \"phase\"")
    if anchor == "fedprox":
        target = truncate(msg.content[p.ARRAYS], rank)
    elif anchor == "phase":
        target = _sent_record(msg, p.ANCHOR, anchor, lm, rank)
    else:
        target = lm.initial_adapter
    weights = (from_arrays(_sent_record(msg, p.FISHER, anchor, lm, rank)) if anchor == "ewc"
               else None)
    return Anchor(lm.model, from_arrays(target), cfg.strategy.anchor_weight, weights)


def _sent_record(msg: Message, key: str, anchor: str, lm: AdaptedModel,
                 rank: int) -> ArrayRecord:
    """The anchor's record the training message must carry, shaped as the adapter
    (truncated to the site's ``rank``)."""
    record = msg.content.array_records.get(key)
    if record is None:
        raise UpdateRejected(f"strategy.anchor is '{anchor}' but the training message "
                             f"carries no '{key}' record")
    record = truncate(record, rank)
    check_update(record, lm.initial_adapter)
    return record

