"""A hostile server against a site's boundary (issue 25, attacks 3, 4 and 5), each run as
the attacker would run it against the real site handlers.

A refusal counts only if the site's own check fired (its log names it) and its ledger is
byte for byte unchanged. On the code before the release gate each attack succeeded: the
site trained without DP when told to, its masked reply carried its training loss and time,
its refusals told the server its update norm, and it joined as many secure sums of one
question as the server asked for.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from secagg_grid import AppGrid, Sites, secagg_federation, simulated_sites

import fedcpt.client.app as client_app
from fedcpt.client import model_handlers
from fedcpt.client.site import resolve_site
from fedcpt.config import RunConfig, load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy.policy import site_policy
from fedcpt.privacy.secagg import participation
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED, STATE
from fedcpt.server.round_loop import request, site_evaluations, train_attempt
from fedcpt.testing.bad_inputs.proposals import _site_data
from fedcpt.testing.site_round import site_context, task_identity, train_message

SITES = ("comedies", "histories", "tragedies", "more-comedies")


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


# --- attack 3: the server switches DP off ------------------------------------------------
def test_a_site_with_a_budget_and_ledger_refuses_a_run_without_dp(tmp_path, caplog):
    """The site set an ε budget and a ledger, not ``require-dp``; the server sends
    ``privacy.enabled = false``. Before: the site trained without DP-SGD and sent its
    exact update. After: DP is on by default for such a site; only its own
    ``require-dp = false`` turns it off."""
    cfg = load_config("smoke-dp", overrides=["privacy.enabled=false"])
    ledger = tmp_path / "clinic.ledger.json"
    context = site_context(str(_site_data(tmp_path)), ledger, name="clinic",
                           unit="field:user_id", **{"epsilon-budget": "4",
                                                    "heldout-fraction": "0.3"})
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    before = _bytes(ledger)
    with task_identity(), caplog.at_level(logging.WARNING, logger="fedcpt.client"):
        reply = client_app.train(train_message(cfg, "run-3", 1, initial), context)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == p.BUDGET_EXHAUSTED
    assert "DP" not in reply.error.reason  # generic: the reason is the site's
    assert any("requires DP-SGD (require-dp)" in m for m in caplog.messages)
    assert _bytes(ledger) == before

    # the site's explicit choice: DP off, and it trains (nothing accounted)
    context.node_config["require-dp"] = "false"
    with task_identity():
        reply = client_app.train(train_message(cfg, "run-3", 1, initial), context)
    assert not reply.has_error() and p.ARRAYS in reply.content


# --- attack 4a/4b: refusals and error text as oracles -----------------------------------
def test_a_noised_sites_answers_do_not_depend_on_how_many_heldout_units_it_holds(
        tmp_path, caplog):
    """The server asks a ``noised`` site for queries of growing size k. Before: the site
    refused, for free (nothing spent), exactly when it held fewer than k held-out units,
    and said so — a bisection per block size gave the histogram of its unit lengths.
    After: whether it answers depends only on k and its policy's minimum; every answer is
    paid in its ledger; no error text carries a count."""
    cfg = load_config("smoke-dp", overrides=["privacy.noise_multiplier=1.0"])
    ledger = tmp_path / "clinic.ledger.json"
    context = site_context(str(_site_data(tmp_path)), ledger, name="clinic",
                           unit="field:user_id", **{"heldout-fraction": "0.3",
                                                    "eval-release": "noised"})
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    for k in (8, 39, 400):  # the site holds about 12 held-out users
        asked = replace(cfg, data=replace(cfg.data, heldout_blocks=k))
        before = _bytes(ledger)
        with task_identity():
            reply = client_app.evaluate(train_message(asked, f"run-{k}", 1, initial), context)
        assert not reply.has_error(), reply.error.reason
        assert _bytes(ledger) != before  # paid for, as every answer is
        assert reply.content[p.METRICS][p.NUM_EXAMPLES] == k * (cfg.data.block_size - 1)
    below = replace(cfg, data=replace(cfg.data, heldout_blocks=7))  # under its public floor
    before = _bytes(ledger)
    with task_identity(), caplog.at_level(logging.WARNING, logger="fedcpt.client"):
        reply = client_app.evaluate(train_message(below, "run-7", 1, initial), context)
    assert reply.has_error() and _bytes(ledger) == before
    assert any("a query must cover at least 8 held-out units" in m for m in caplog.messages)
    assert not any(ch.isdigit() for ch in reply.error.reason)  # no count, no key value


# --- attack 4c: site-level DP's masked reply and the norm oracle -------------------------
HONEST = ["privacy.user_level=true", "privacy.user_noise_multiplier=1.0",
          "privacy.user_clipping_norm=0.5", "secagg.mode=on"]
A, B, C, D, E = NODES = (11, 22, 33, 44, 55)


def _stage_three(tmp_path: Path, text: Path, run_id: str, overrides: list[str],
                 ) -> tuple[Message, Context]:
    """Stages 1–2 honestly for five sites under site-level DP; returns victim A's reply to
    the real stage-3 handler (A: a deployed site with its own ledger, DP-SGD off by its
    own choice: its protection is the site-level noise)."""
    cfg = load_config("smoke", overrides=[*HONEST, *overrides])
    adapter = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity():
        config = train_message(cfg, run_id, 1, adapter).content[p.CONFIG]
    sites = Sites(NODES, SecAggParams.for_round(cfg, len(NODES)), adapter, config)
    victim = site_context(str(text), tmp_path / "victim.ledger.json", name="victim",
                          **{"require-dp": "false"})
    sites.contexts[A] = victim
    keys = {n: sites.setup(n) for n in NODES}
    sealed = {n: sites.share_keys(n, Sites.key_list(keys, NODES)) for n in NODES}
    src = sorted(s for s in sealed if A in list(sealed[s]["dst"]))
    boxes = [sealed[s]["sealed"][list(sealed[s]["dst"]).index(A)] for s in src]
    with task_identity():
        msg = Message(RecordDict({p.ARRAYS: adapter, p.CONFIG: config, STATE: ConfigRecord(
            {"src": src, "sealed": boxes})}), dst_node_id=A, message_type=MASKED)
        return model_handlers.secagg_masked(msg, victim), victim


def test_the_masked_reply_under_site_level_dp_carries_no_loss_or_time(tmp_path, write_text):
    reply, _ = _stage_three(tmp_path, write_text("victim.txt", 40_000, seed=5), "run-m", [])
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content[p.METRICS]
    assert p.TRAIN_LOSS not in metrics  # before: the training loss, in the clear
    assert metrics[p.TRAIN_SECONDS] == 0.0  # before: the seconds the site took


@pytest.mark.parametrize("seed", [5, 9])
def test_norm_refusals_under_site_level_dp_reveal_nothing_about_the_update(
        tmp_path, write_text, seed, caplog):
    """The server retries stage 3 with other ``federation.max_update_norm`` bounds (a new
    run id each time). Before: the site refused exactly when its raw update norm exceeded
    the bound, so a bisection gave the norm. After: the update is clipped to C before it is
    noised, so the norm check refuses exactly when the bound is below C — for any data (two
    sites with different text give the same answers) — before it trains; above C the site
    sends once, then has answered this adapter (participation record)."""
    text = write_text(f"victim{seed}.txt", 40_000, seed=seed)
    ledger = tmp_path / "victim.ledger.json"
    answers = {}
    for i, bound in enumerate((1e-6, 1e-3, 0.49, 0.5, 10.0)):
        before = _bytes(ledger)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedcpt.client"):
            reply, _ = _stage_three(tmp_path, text, f"run-{i}",
                                    [f"federation.max_update_norm={bound}"])
        if not reply.has_error():
            answers[bound] = "sent"
            continue
        assert _bytes(ledger) == before and str(bound) not in reply.error.reason
        [line] = [m for m in caplog.messages if "refused this" in m]
        answers[bound] = ("norm bound" if "clipping norm 0.5 exceeds the update norm bound"
                          in line else "already answered" if "already joined" in line
                          else line)
    assert answers == {1e-6: "norm bound", 1e-3: "norm bound", 0.49: "norm bound",
                       0.5: "sent", 10.0: "already answered"}


# --- attack 5: differencing two sums of one question ----------------------------------
def _four_sites(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, sites=(*cfg.sites, replace(cfg.sites[0],
                                                               name="more-comedies")))


# Where the sites keep their record of the sums they joined: beside a ledger (each site's
# ledger under privacy.ledger_dir, as a deployed site keeps it) or, without a ledger
# location, in the run's Flower Context.state only (nothing on disk to compare).
KEPT = pytest.mark.parametrize("kept", ["beside-ledger", "in-state"])


def _kept(cfg: RunConfig, tmp_path: Path, kept: str) -> RunConfig:
    if kept == "in-state":
        return cfg
    return replace(cfg, privacy=replace(cfg.privacy, ledger_dir=str(tmp_path / "ledgers")))


def _ledgers(cfg: RunConfig, grid: AppGrid) -> dict[int, Path]:
    """Node → the ledger location each simulated site's own policy names (none in state)."""
    ledgers = {}
    for node, context in grid.contexts.items():
        node_config = dict(context.node_config)
        policy = site_policy(cfg, resolve_site(cfg, node_config), node_config, deployed=False)
        if policy.ledger_path:
            ledgers[node] = Path(policy.ledger_path)
    return ledgers


class SubsetGrid(AppGrid):
    """The server's grid, showing it only the nodes in ``only`` when it samples."""

    only: set[int] | None = None

    def get_node_ids(self):
        return [n for n in self.contexts if self.only is None or n in self.only]


@pytest.fixture
def adapter() -> ArrayRecord:
    cfg = load_config("smoke")
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array((a.numpy() + 0.05 * rng.normal(size=a.numpy().shape))
                                 .astype(a.numpy().dtype)) for k, a in initial.items()})


def _refused_by(messages: list[str]) -> list[str]:
    """The sites (``partition <i>``) whose own participation check refused, from their log."""
    return sorted(m.split(" refused this ")[0].removeprefix("site ") for m in messages
                  if "already joined a secure sum" in m)


@KEPT
@pytest.mark.usefixtures("flower_task")
def test_a_training_round_resent_without_one_site_gives_nothing_to_subtract(
        tmp_path, adapter, caplog, kept, unchanged_site_files):
    """SecAgg without DP: the server runs round 1 with all four sites, then sends round 1
    again without the victim. Before: both sums were unmasked and their difference was
    the victim's exact update. After: the three others sent their update for this round
    already, refuse the second session (their own check, in their log), no second sum
    exists, and no site's files beside its ledger change."""
    cfg = _kept(_four_sites(load_config("smoke", overrides=[
        "secagg.mode=on", "federation.min_sites=3", "train.local_steps=1"])), tmp_path, kept)
    grid = SubsetGrid(simulated_sites(tmp_path, SITES))
    fed = secagg_federation(grid, cfg)
    ledgers = _ledgers(cfg, grid)
    assert len(ledgers) == (4 if kept == "beside-ledger" else 0)
    content = request(adapter, fed.config, 1)
    first = train_attempt(fed, 1, adapter, content, None)
    assert first.aggregate is not None  # the honest round: one sum over the four sites
    victim = sorted(grid.contexts)[0]
    grid.only = set(grid.contexts) - {victim}
    sent = len(grid.replies)
    with caplog.at_level(logging.WARNING, logger="fedcpt.client"), \
            unchanged_site_files(*ledgers.values()) as before:
        second = train_attempt(fed, 1, adapter, content, sorted(grid.only))
    assert second.aggregate is None
    assert _refused_by(caplog.messages) == sorted(
        f"partition {grid.contexts[n].node_config['partition-id']}" for n in grid.only)
    assert not any(r.has_content() and p.MASKED in r.content for r in grid.replies[sent:])
    for ledger in ledgers.values():  # what was compared: each site's record of round 1
        assert participation.record_path(ledger).name in before[ledger]


@KEPT
@pytest.mark.usefixtures("flower_task")
def test_secure_evaluations_of_one_adapter_over_different_groups_give_one_sum(
        tmp_path, adapter, caplog, kept, unchanged_site_files):
    """Four secure evaluations of one adapter over the four groups of three sites. Before:
    four sums, from which every site's own loss follows (to 1e-8). After: each site joins
    one un-noised sum per adapter version; only the first sum exists. In each later
    evaluation every site asked before refuses (its own check, in its log) and its files
    beside its ledger do not change; a site asked for the first time joins."""
    cfg = _kept(_four_sites(load_config("smoke", overrides=[
        "secagg.mode=on", "site_policy.eval_release=secagg"])), tmp_path, kept)
    grid = SubsetGrid(simulated_sites(tmp_path, SITES))
    fed = secagg_federation(grid, cfg)
    fed.cfg = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, eval_sites_per_round=3))
    ledgers = _ledgers(cfg, grid)
    assert len(ledgers) == (4 if kept == "beside-ledger" else 0)
    sums, asked = [], set()
    for left_out in sorted(grid.contexts):
        grid.only = set(grid.contexts) - {left_out}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedcpt.client"), \
                unchanged_site_files(*(ledgers[n] for n in asked if n in ledgers)) as before:
            sums += site_evaluations(fed, 1, adapter)
        assert _refused_by(caplog.messages) == sorted(
            f"partition {grid.contexts[n].node_config['partition-id']}"
            for n in grid.only & asked)
        for ledger in before:  # what was compared: the record of the sum it joined
            assert participation.record_path(ledger).name in before[ledger]
        asked |= grid.only
    assert len(sums) == 1 and sums[0].summed_sites == 3
