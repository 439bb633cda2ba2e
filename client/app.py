"""Flower ClientApp: a data site trains the global LoRA adapter on its own text.

Every message carries the run configuration (``config["run-config"]``, JSON) so the
same app serves simulations and deployments; a deployed site names its data with
``--node-config 'site-name=… data-path=…'``. Only adapter tensors and scalar metrics
are sent back — never base weights or text.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedcpt.client.errors import report_site_errors
from fedcpt.client.site import (
    open_ledger,
    policy_for,
    require_dp,
    require_secagg,
    resolve_site,
    site_blocks,
)
from fedcpt.client.update_cache import (
    StoredUpdate,
    UpdateCache,
    arrays_digest,
    reusable_update,
)
from fedcpt.config import RunConfig, SiteConfig
from fedcpt.core import protocol as p
from fedcpt.core.adapters import (
    adapter_state,
    check_update,
    from_arrays,
    load_adapter,
    to_arrays,
    update_norm,
)
from fedcpt.core.data import TokenBlocks
from fedcpt.core.model import AdaptedModel, load_adapted_model
from fedcpt.core.training import Anchor, TrainResult, train_adapter
from fedcpt.exceptions import FedcptError, UpdateRejected
from fedcpt.privacy.dpsgd import train_adapter_dp
from fedcpt.privacy.ledger import SiteRefused
from fedcpt.privacy.plan import plan_run
from fedcpt.privacy.policy import SitePolicy, accept_proposal
from fedcpt.privacy.release import eval_reservation, release_evaluation
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.encoding import encode
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.site import STATE
from fedcpt.privacy.user_level import clip_when_asked

log = logging.getLogger(__name__)

app = ClientApp(mods=[report_site_errors, clip_when_asked])


@functools.lru_cache(maxsize=8)
def _config(text: str) -> RunConfig:
    return RunConfig.from_json(text)


def _run_config(msg: Message) -> RunConfig:
    return _config(str(msg.content[p.CONFIG][p.RUN_CONFIG]))


def _setup(msg: Message) -> tuple[RunConfig, AdaptedModel, int]:
    cfg = _run_config(msg)
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    load_adapter(lm.model, msg.content[p.ARRAYS])
    return cfg, lm, int(msg.content[p.CONFIG][p.SERVER_ROUND])


def _refusal(msg: Message, err: Exception, code: int = p.UPDATE_REFUSED) -> Message:
    log.warning("%s", err)
    return Message(Error(code=code, reason=str(err)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``train.local_steps`` steps and return it.

    A site may refuse (an error reply naming the reason): when the round would exceed its
    privacy budget, when it requires DP and the run has none, or when secure aggregation
    is required and this message is a plain one.
    """
    try:
        require_secagg(_run_config(msg), dict(context.node_config), secure=False)
        arrays, metrics, site = _train_update(msg, context)
    except SiteRefused as err:
        return _refusal(msg, err, p.BUDGET_EXHAUSTED)
    content = RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


def _train_update(msg: Message, context: Context,
                  ) -> tuple[ArrayRecord, dict[str, float], SiteConfig]:
    """The site's trained adapter and metrics (under DP, after the spend is recorded)."""
    cfg, lm, server_round = _setup(msg)
    node_config = dict(context.node_config)
    site = resolve_site(cfg, node_config)
    policy = policy_for(cfg, site, node_config)
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


# --- Secure aggregation (SecAgg+): stages 1, 2 and 4 carry keys and shares only -------
def _secagg_stage(msg: Message, stage: Callable[[ConfigRecord], ConfigRecord]) -> Message:
    try:
        record = stage(msg.content.config_records[STATE])
    except FedcptError as err:
        return _refusal(msg, err)
    return Message(RecordDict({STATE: record}), reply_to=msg)


@app.train("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for the round; only the public halves leave."""
    return _secagg_stage(msg, lambda r: secagg_site.setup(context, msg.metadata.dst_node_id, r))


@app.train("secagg_share_keys")
def secagg_share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: shares of this site's secrets, encrypted for each neighbour."""
    return _secagg_stage(msg, lambda r: secagg_site.share_keys(context, r))


@app.train("secagg_masked")
def secagg_masked(msg: Message, context: Context) -> Message:
    """Stage 3: train as in :func:`train`, check the update here (the server will only
    see the sum), then send it quantised and masked."""
    try:
        secagg_site.receive_shares(context, msg.content.config_records[STATE])
        arrays, metrics, site = _train_update(msg, context)
        cfg, reference = _run_config(msg), msg.content[p.ARRAYS]
        check_update(arrays, reference)
        norm = update_norm(arrays, reference)
        if cfg.federation.max_update_norm and norm > cfg.federation.max_update_norm:
            raise UpdateRejected(f"update norm {norm:.3f} exceeds the bound "
                                 f"{cfg.federation.max_update_norm}; not sent")
        params = SecAggParams.from_record(context.state.config_records[STATE])
        vector = encode(arrays, reference, int(metrics[p.NUM_EXAMPLES]), params)
        masked = secagg_site.mask(context, vector)
    except SiteRefused as err:
        return _refusal(msg, err, p.BUDGET_EXHAUSTED)
    except FedcptError as err:
        return _refusal(msg, err)
    content = RecordDict({p.MASKED: ArrayRecord({p.MASKED_VECTOR: Array(masked)}),
                          p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 4: the shares that unmask the sum; then the round's secrets are deleted."""
    return _secagg_stage(msg, lambda r: secagg_site.unmask(context, r))


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
    toward the initial one weighted by the Fisher the server sent."""
    if cfg.strategy.anchor == "none" or cfg.strategy.anchor_weight == 0:
        return None
    target = msg.content[p.ARRAYS] if cfg.strategy.anchor == "fedprox" else lm.initial_adapter
    weights = None
    if cfg.strategy.anchor == "ewc":
        fisher = msg.content.array_records.get(p.FISHER)
        if fisher is None:
            raise UpdateRejected("strategy.anchor is 'ewc' but the training message carries "
                                 "no 'fisher' record")
        check_update(fisher, lm.initial_adapter)
        weights = from_arrays(fisher)
    return Anchor(lm.model, from_arrays(target), cfg.strategy.anchor_weight, weights)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which site this node is (the server trains only a phase's sites)."""
    cfg = _config(str(msg.content[p.CONFIG][p.RUN_CONFIG]))
    site = resolve_site(cfg, dict(context.node_config))
    return Message(content=RecordDict({p.SITE: ConfigRecord({"name": site.name})}),
                   reply_to=msg)


# Base-model loss per (site, model, data, policy): the base never changes, so compute it
# (and, under a noised release, pay for it) once per process.
_base_losses: dict[tuple, dict] = {}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out domain loss of the received adapter on this site's data (and of the base),
    released only as the site's policy allows (:mod:`fedcpt.privacy.release`)."""
    cfg, lm, _ = _setup(msg)
    node_config = dict(context.node_config)
    site = resolve_site(cfg, node_config)
    policy = policy_for(cfg, site, node_config)
    blocks = site_blocks(site, cfg.model, cfg.data, policy)
    try:
        ledger = None
        if policy.eval_release == "noised" and policy.ledger_path:
            ledger = open_ledger(cfg, policy, accept_proposal(policy, cfg, blocks.units))
        metrics = release_evaluation(
            cfg, lm, policy, blocks, run_id=str(msg.content[p.CONFIG].get(p.RUN_ID, "")),
            base_cache=_base_losses.setdefault((site, cfg.model, cfg.data, policy), {}),
            ledger=ledger)
    except SiteRefused as err:
        return _refusal(msg, err, p.BUDGET_EXHAUSTED)
    content = RecordDict({p.METRICS: MetricRecord(metrics),
                          p.SITE: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
