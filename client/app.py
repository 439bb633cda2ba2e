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

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcpt.client.site import resolve_site, site_blocks
from fedcpt.client.trainer import train_adapter
from fedcpt.config import RunConfig
from fedcpt.core.adapters import adapter_state, load_adapter, to_arrays
from fedcpt.core.data import spread
from fedcpt.core.evaluation import evaluate_blocks
from fedcpt.core.model import AdaptedModel, load_adapted_model

log = logging.getLogger(__name__)

RUN_CONFIG_KEY = "run-config"
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
    """Train the received adapter for ``train.local_steps`` steps and return it."""
    cfg, lm, server_round = _setup(msg, context)
    site = resolve_site(cfg, dict(context.node_config))
    blocks = site_blocks(site, cfg.model, cfg.data)
    lr = cfg.train.lr_at(server_round, cfg.federation.rounds)
    # Seed per (run, site, round): reproducible, different across sites and rounds.
    seed = zlib.crc32(f"{cfg.seed}/{site.name}/{server_round}".encode())
    result = train_adapter(lm, blocks.train, cfg.train, lr=lr, seed=seed)
    log.info("site %s round %d: loss %.4f, %d steps in %.1fs", site.name, server_round,
             result.mean_loss, result.steps, result.seconds)
    metrics = MetricRecord({
        "num-examples": result.examples,
        "train-loss": result.mean_loss,
        "train-tokens": result.tokens,
        "train-seconds": result.seconds,
        "lr": lr,
    })
    content = RecordDict({
        "arrays": to_arrays(adapter_state(lm.model)),
        "metrics": metrics,
        SITE_KEY: ConfigRecord({"name": site.name}),
    })
    return Message(content=content, reply_to=msg)


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
