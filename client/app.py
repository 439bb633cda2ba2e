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

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcpt.client.site import open_ledger, resolve_site, site_blocks
from fedcpt.config import RunConfig
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.core.data import spread
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, load_adapted_model
from fedcpt.core.training import train_adapter
from fedcpt.privacy.dpsgd import train_adapter_dp
from fedcpt.privacy.ledger import PrivacyBudgetExhausted, PrivacyLedger
from fedcpt.privacy.plan import SitePlan, plan_site

log = logging.getLogger(__name__)

RUN_CONFIG_KEY = "run-config"
RUN_ID_KEY = "run-id"
BUDGET_EXHAUSTED = 100  # Error code of a reply from a site that refused to train
SITE_KEY = "site"

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(text: str) -> RunConfig:
    return RunConfig.from_json(text)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, AdaptedModel, int]:
    config = msg.content["config"]
    cfg = _config(str(config[RUN_CONFIG_KEY]))
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    load_adapter(lm.model, msg.content["arrays"])
    return cfg, lm, int(config["server-round"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``train.local_steps`` steps and return it.

    With DP on, the site checks its ledger first and refuses (an error reply naming the
    reason) if the round would exceed its budget; the spend is recorded durably before
    the update leaves the site.
    """
    cfg, lm, server_round = _setup(msg, context)
    site = resolve_site(cfg, dict(context.node_config))
    blocks = site_blocks(site, cfg.model, cfg.data)
    lr = cfg.train.lr_at(server_round, cfg.federation.rounds)
    metrics: dict[str, float | int] = {"lr": lr}
    if cfg.privacy.enabled:
        run_id = str(msg.content["config"][RUN_ID_KEY])
        ledger = open_ledger(cfg, site, dict(context.node_config), len(blocks.train))
        plan = _plan(cfg, site.name, len(blocks.train), run_id, ledger)
        try:
            ledger.check_budget(plan.noise_multiplier, plan.sample_rate, cfg.train.local_steps)
        except PrivacyBudgetExhausted as err:
            log.warning("%s", err)
            return Message(Error(code=BUDGET_EXHAUSTED, reason=str(err)), reply_to=msg)
        result = train_adapter_dp(lm, blocks.train, cfg.train, cfg.privacy, lr=lr,
                                  noise_multiplier=plan.noise_multiplier)
        ledger.record(run_id, server_round, plan.noise_multiplier, plan.sample_rate,
                      result.steps)
        metrics.update({
            "epsilon": ledger.epsilon(),
            "epsilon-rdp": ledger.epsilon("rdp"),
            "delta": ledger.delta,
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate,
            "dp-steps": ledger.steps,
        })
    else:
        # Seed per (run, site, round): reproducible, different across sites and rounds.
        seed = zlib.crc32(f"{cfg.seed}/{site.name}/{server_round}".encode())
        result = train_adapter(lm, blocks.train, cfg.train, lr=lr, seed=seed)
    log.info("site %s round %d: loss %.4f, %d steps in %.1fs", site.name, server_round,
             result.mean_loss, result.steps, result.seconds)
    metrics.update({
        "num-examples": result.examples,
        "train-loss": result.mean_loss,
        "train-tokens": result.tokens,
        "train-seconds": result.seconds,
    })
    content = RecordDict({
        "arrays": to_arrays(adapter_state(lm.model)),
        "metrics": MetricRecord(metrics),
        SITE_KEY: ConfigRecord({"name": site.name}),
    })
    return Message(content=content, reply_to=msg)


@functools.lru_cache(maxsize=64)
def _cached_plan(cfg: RunConfig, site: str, records: int, run_id: str,
                 prior: tuple, delta: float) -> SitePlan:
    plan = plan_site(cfg.privacy, site=site, records=records, batch_size=cfg.train.batch_size,
                     steps=cfg.federation.rounds * cfg.train.local_steps, delta=delta,
                     prior=list(prior))
    log.info("site %s DP plan: σ=%.4f, q=%.5f, %d steps, expected ε=%.3f (δ=%.3g)", site,
             plan.noise_multiplier, plan.sample_rate, plan.steps, plan.expected_epsilon,
             plan.delta)
    return plan


def _plan(cfg: RunConfig, site: str, records: int, run_id: str,
          ledger: PrivacyLedger) -> SitePlan:
    """This run's plan on top of what the site spent in earlier runs and phases."""
    prior = tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries
                  if e.run != run_id)
    return _cached_plan(cfg, site, records, run_id, prior, ledger.delta)


# Base-model loss per (site, model, data): the base never changes, so compute it once.
_base_losses: dict[tuple, float] = {}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out domain loss of the received adapter on this site's data (and of the base)."""
    cfg, lm, _ = _setup(msg, context)
    site = resolve_site(cfg, dict(context.node_config))
    heldout = spread(site_blocks(site, cfg.model, cfg.data).heldout, cfg.data.heldout_blocks)
    key = (site, cfg.model, cfg.data)
    if key not in _base_losses:
        with lm.model.disable_adapter():
            _base_losses[key] = evaluate_blocks(lm, heldout, cfg.train.eval_batch_size).loss
    result = evaluate_blocks(lm, heldout, cfg.train.eval_batch_size)
    metrics = MetricRecord({
        "num-examples": result.tokens,
        "domain-loss": result.loss,
        "domain-base-loss": _base_losses[key],
        "domain-ece": result.ece,
    })
    content = RecordDict({"metrics": metrics, SITE_KEY: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
