"""Flower ClientApp: a data site trains the global LoRA adapter on its own text.

Every message carries the run configuration (``config["run-config"]``, JSON) so the
same app serves simulations and deployments; a deployed site names its data with
``--node-config 'site-name=… data-path=…'``. Only adapter tensors and scalar metrics
are sent back — never base weights or text — and every reply leaves through the release
gate (:mod:`~fedcpt.client.gate`). This module registers the handlers: training and the
query are in :mod:`~fedcpt.client.model_handlers`, evaluation in
:mod:`~fedcpt.client.eval_step`, the SecAgg+ key-exchange stages in
:mod:`~fedcpt.client.secagg_stages` (training and evaluation sessions).

A deployed SuperNode starts a ClientApp process for every message. The handlers that open
the model import their module when called, so that a key-exchange stage (four of the five
messages of each SecAgg+ session) starts without torch, transformers, peft or Opacus
(``tests/client/test_light_stages.py``): importing this module took 0.55 CPU-s, against
about 17 with them (2-core AMX Xeon).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcpt.client import secagg_stages
from fedcpt.client.clipping import clip_when_asked
from fedcpt.client.errors import report_site_errors
from fedcpt.client.upload import compact_upload
from fedcpt.core import protocol as p
from fedcpt.privacy.secagg.context import EVALUATE

log = logging.getLogger(__name__)

# compact_upload sits outside clip_when_asked: Flower's clipping mod works on the adapter
# in the global layout, the upload encoding (rank, dtype) comes after it
app = ClientApp(mods=[report_site_errors, compact_upload, clip_when_asked])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``train.local_steps`` steps and return it.

    A site may refuse (a generic error reply; the reason in its own log): when the round
    would exceed its privacy budget, when it requires DP and the run has none, or when
    secure aggregation is required and this message is a plain one.
    """
    from fedcpt.client import model_handlers  # loads the model: see the module docstring

    return model_handlers.train(msg, context)


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
    from fedcpt.client import model_handlers  # loads the model: see the module docstring

    return model_handlers.secagg_masked(msg, context)


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
    from fedcpt.client import model_handlers  # resolves the site and its data

    return model_handlers.query(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out domain loss of the received adapter on this site's data (and of the base),
    released only as the site's policy allows (:mod:`fedcpt.privacy.release`); a site whose
    policy is ``eval-release=secagg`` refuses this plain message."""
    from fedcpt.client import eval_step  # loads the model: see the module docstring

    return eval_step.plain(msg, context)


# --- Evaluation under SecAgg+: the same five stages, in the round's evaluation session ---
@app.evaluate(p.SECAGG_SETUP)
def secagg_eval_setup(msg: Message, context: Context) -> Message:
    """Stage 1 of the evaluation session (its round context bound to ``evaluate``)."""
    return secagg_stages.setup(msg, context, EVALUATE)


@app.evaluate(p.SECAGG_SHARE_KEYS)
def secagg_eval_share_keys(msg: Message, context: Context) -> Message:
    """Stage 2 of the evaluation session."""
    return secagg_stages.share_keys(msg, context, EVALUATE)


@app.evaluate(p.SECAGG_MASKED)
def secagg_eval_masked(msg: Message, context: Context) -> Message:
    """Stage 3: evaluate as in :func:`evaluate`, then send the statistics fixed-point
    encoded and masked: the server learns only their sum over the sites."""
    from fedcpt.client import eval_step  # loads the model: see the module docstring

    return eval_step.masked(msg, context)


@app.evaluate(p.SECAGG_CONSISTENCY)
def secagg_eval_consistency(msg: Message, context: Context) -> Message:
    """Stage 4 of the evaluation session: sign its survivor set."""
    return secagg_stages.consistency(msg, context, EVALUATE)


@app.evaluate(p.SECAGG_UNMASK)
def secagg_eval_unmask(msg: Message, context: Context) -> Message:
    """Stage 5 of the evaluation session: the shares that unmask the sum."""
    return secagg_stages.unmask(msg, context, EVALUATE)
