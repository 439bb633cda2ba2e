"""A site's evaluation released only through secure aggregation (``eval-release=secagg``).

Three simulated smoke sites (the tiny Llama, their own plays) behind the real ClientApp
(:class:`secagg_grid.AppGrid`); the server is the round loop's own evaluation
(:func:`~fedcpt.server.round_loop.site_evaluations`) or, in the attacks, a test that
builds each message itself and looks at what came back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict
from secagg_grid import AppGrid, secagg_federation, simulated_sites

from fedcpt.config import RunConfig, SitePolicySettings, load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.secagg.context import EVALUATE, TRAIN
from fedcpt.privacy.secagg.eval_sum import (
    LIMB_BITS,
    LIMBS,
    MAX_SITES,
    RESOLUTION_BITS,
    decode_evaluation,
    encode_evaluation,
)
from fedcpt.privacy.secagg.server import STATE, stage_types
from fedcpt.privacy.secagg.site import state_key
from fedcpt.server.round_loop import request, site_evaluations
from fedcpt.strategies.base import eval_report
from fedcpt.strategies.secagg_fedavg import SecAggFedAvg

pytestmark = pytest.mark.usefixtures("flower_task")  # Messages are built here

SITES = ("comedies", "histories", "tragedies")
_, E_SHARE_KEYS, E_MASKED, E_CONSISTENCY, E_UNMASK = stage_types(EVALUATE)
RESOLUTION = 2.0**-(RESOLUTION_BITS + 1)  # the documented bound on the mean's error


def _cfg(secagg: str = "on", **policy) -> RunConfig:
    return load_config("smoke", overrides=[f"secagg.mode={secagg}", *(
        f"site_policy.{k}={v}" for k, v in policy.items())])


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> dict[int, dict]:
    return simulated_sites(tmp_path_factory.mktemp("fed"), SITES)


@pytest.fixture(scope="module")
def adapter() -> ArrayRecord:
    """The smoke run's adapter, moved off the base (LoRA B is zero at the start)."""
    cfg = _cfg()
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array((a.numpy() + 0.05 * rng.normal(size=a.numpy().shape))
                                 .astype(a.numpy().dtype)) for k, a in initial.items()})


def _content(cfg: RunConfig, adapter: ArrayRecord) -> RecordDict:
    return request(adapter, ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: "run-e"}), 1)


def _plain(cfg: RunConfig, nodes: dict[int, dict], adapter: ArrayRecord):
    grid = AppGrid(nodes)
    return [grid.send(n, MessageType.EVALUATE, _content(cfg, adapter)) for n in nodes]


# --- the honest path ------------------------------------------------------------------
def test_the_secure_mean_is_the_token_weighted_mean_of_the_sites_plain_evaluations(
        nodes, adapter):
    grid = AppGrid(nodes)
    [secure] = site_evaluations(secagg_federation(grid, _cfg(eval_release="secagg")), 1, adapter)
    # what the server learned: masked vectors and keys, no site's metrics
    assert not [r for r in grid.replies if r.has_error()]
    assert all(p.METRICS not in r.content for r in grid.replies)
    plain = [eval_report(r) for r in _plain(_cfg("off", eval_release="plain"), nodes, adapter)]
    assert len({round(r.loss, 3) for r in plain}) == 3  # three different sites
    tokens = sum(r.tokens for r in plain)
    assert (secure.summed_sites, secure.tokens, secure.clipped) == (3, tokens, 0)
    for field in ("loss", "base_loss", "ece"):
        expected = sum(getattr(r, field) * r.tokens for r in plain) / tokens
        assert abs(getattr(secure, field) - expected) <= RESOLUTION, field
    assert secure.loss != pytest.approx(secure.base_loss)  # the adapter moved the loss


def test_a_secagg_site_refuses_a_plain_evaluate_message(nodes, adapter, site_refusal):
    for secagg in ("on", "off"):
        cfg = _cfg(secagg, eval_release="secagg")
        for reply in _plain(cfg, nodes, adapter):
            site_refusal(reply, "eval_release = secagg.*refuses this plain evaluate message")


def test_out_of_range_values_are_clipped_at_the_site_and_counted(nodes, adapter):
    grid = AppGrid(nodes)
    cfg = _cfg(eval_release="secagg", eval_loss_bound=0.5)  # every loss is above 0.5 nats
    [secure] = site_evaluations(secagg_federation(grid, cfg), 1, adapter)
    assert secure.clipped == 6  # loss and base loss at each of the three sites
    assert abs(secure.loss - 0.5) <= RESOLUTION and abs(secure.base_loss - 0.5) <= RESOLUTION


def _with_policies(*releases: str) -> RunConfig:
    """The smoke run with one simulated site per release (a fourth reads comedies too)."""
    cfg = _cfg(eval_release="secagg")
    sites = (*cfg.sites, dataclasses.replace(cfg.sites[0], name="more-comedies"))
    return dataclasses.replace(cfg, sites=tuple(
        dataclasses.replace(s, policy=SitePolicySettings(eval_release=r))
        for s, r in zip(sites[:len(releases)], releases, strict=True)))


def test_mixed_federations_evaluate_masked_and_a_site_releasing_nothing_drops_out(
        tmp_path, adapter, site_refusal):
    four = simulated_sites(tmp_path, (*SITES, "more-comedies"))
    grid = AppGrid(four)
    cfg = _with_policies("nothing", "plain", "secagg", "secagg")
    [secure] = site_evaluations(secagg_federation(grid, cfg), 1, adapter)
    assert secure.summed_sites == 3  # the plain site evaluated masked too
    assert all(p.METRICS not in r.content for r in grid.replies if r.has_content())
    [refusal] = [r for r in grid.replies if r.has_error()]
    site_refusal(refusal, "releases no evaluation")  # and its masks left the sum
    three = {n: c for n, c in four.items() if c["partition-id"] < 3}
    grid = AppGrid(three)
    cfg = _with_policies("nothing", "secagg", "secagg")
    assert site_evaluations(secagg_federation(grid, cfg), 1, adapter) == []
    # a sum of the two others would reveal each one's to the other: the server stopped
    # before the consistency check, and no site revealed a share
    assert {r.metadata.message_type for r in grid.replies} == {
        stage_types(EVALUATE)[0], E_SHARE_KEYS, E_MASKED}


def test_sites_assuming_a_colluder_evaluate_only_under_a_threshold_it_cannot_beat(
        nodes, adapter, tmp_path, site_refusal):
    """Three sites: a majority threshold 2 is beaten by one colluding site (2·2 ≤ 3 + 1),
    so sites assuming one colluder (the site default) mask nothing (and a noised site pays
    for nothing); at threshold 3, the server's default, they evaluate."""
    for release in ("secagg", "noised"):
        grid = AppGrid(nodes)
        cfg = load_config("smoke", overrides=[
            "secagg.mode=on", f"privacy.ledger_dir={tmp_path / release}",
            "secagg.reconstruction_threshold=2", f"site_policy.eval_release={release}"])
        assert site_evaluations(secagg_federation(grid, cfg), 1, adapter) == []
        refusals = [r for r in grid.replies if r.has_error()]
        assert len(refusals) == 3
        for refusal in refusals:
            site_refusal(refusal, "refuses `secagg.reconstruction_threshold` = 2 over 3 "
                                  "neighbours")
        assert all(p.MASKED not in r.content for r in grid.replies if r.has_content())
        assert not list((tmp_path / release).glob("*.ledger.json"))  # nothing was spent
    grid = AppGrid(nodes)
    cfg = load_config("smoke", overrides=["secagg.mode=on", "site_policy.eval_release=secagg"])
    [secure] = site_evaluations(secagg_federation(grid, cfg), 1, adapter)
    assert secure.summed_sites == 3


def test_the_sites_training_session_survives_the_rounds_evaluation_session(nodes, adapter):
    grid, cfg = AppGrid(nodes), _cfg(eval_release="secagg")
    training = SecAggFedAvg(cfg=cfg).open_round(grid, list(nodes), 1, 5.0,
                                                _content(cfg, adapter), TRAIN)
    training.share_keys()
    before = {n: dict(c.state.config_records[state_key(TRAIN)]) for n, c in grid.contexts.items()}
    [secure] = site_evaluations(secagg_federation(grid, cfg), 1, adapter)
    assert secure.summed_sites == 3
    for n, c in grid.contexts.items():
        assert dict(c.state.config_records[state_key(TRAIN)]) == before[n]  # still at stage 2
        assert state_key(EVALUATE) not in c.state.config_records  # answered stage 5: forgot


# --- a malicious server ----------------------------------------------------------------
def _open(grid: AppGrid, cfg: RunConfig, adapter: ArrayRecord, purpose: str):
    """Stages 1–2 of a session, honestly: the SecAggRound and each node's shares."""
    session = SecAggFedAvg(cfg=cfg).open_round(grid, sorted(grid.contexts), 1, 5.0,
                                               _content(cfg, adapter), purpose)
    return session, session.share_keys()


def _masked(content: RecordDict, shares: ConfigRecord) -> RecordDict:
    return RecordDict({**dict(content.items()), STATE: shares})


@pytest.fixture
def refused(site_refusal):
    """The site revealed nothing: a generic error reply, the check named in its log."""
    return site_refusal


def test_training_shares_replayed_into_the_evaluation_session_fail_at_the_site(nodes,
                                                                              adapter,
                                                                              refused):
    grid, cfg = AppGrid(nodes), _cfg(eval_release="secagg")
    _, training_shares = _open(grid, cfg, adapter, TRAIN)
    _open(grid, cfg, adapter, EVALUATE)
    content = _content(cfg, adapter)
    for node in nodes:
        reply = grid.send(node, E_MASKED, _masked(content, training_shares[node]))
        refused(reply, "failed authentication")
        assert grid.contexts[node].state.config_records[state_key(EVALUATE)]["stage"] == (
            "share_keys")  # it neither evaluated nor masked anything


@pytest.mark.parametrize("asked, bound_to", [(EVALUATE, TRAIN), (TRAIN, EVALUATE)])
def test_a_round_context_bound_to_the_other_purpose_is_refused_at_setup(nodes, adapter,
                                                                       asked, bound_to,
                                                                       refused):
    grid, cfg = AppGrid(nodes), _cfg(eval_release="secagg")
    session = SecAggFedAvg(cfg=cfg).open_round(grid, sorted(nodes), 1, 5.0,
                                               _content(cfg, adapter), bound_to)
    record = ConfigRecord({**session.params.to_record(), **session.context.to_record()})
    for node in nodes:
        reply = grid.send(node, stage_types(asked)[0], RecordDict({STATE: record}))
        refused(reply, f"bound to the {bound_to} session")
        assert state_key(asked) not in grid.contexts[node].state.config_records


def test_training_key_signatures_do_not_verify_in_the_evaluation_session(nodes, adapter,
                                                                         refused):
    grid, cfg = AppGrid(nodes), _cfg(eval_release="secagg")
    training, _ = _open(grid, cfg, adapter, TRAIN)
    evaluation = SecAggFedAvg(cfg=cfg).open_round(grid, sorted(nodes), 1, 5.0,
                                                  _content(cfg, adapter), EVALUATE)
    record = ConfigRecord({**evaluation.params.to_record(), **evaluation.context.to_record()})
    me, *others = sorted(nodes)
    mine = grid.send(me, stage_types(EVALUATE)[0], RecordDict({STATE: record}))
    keys = {me: tuple(mine.content.config_records[STATE][k]
                      for k in ("pk1", "pk2", "signature", "cert")),
            **{n: (*training.public[n], *training.signed[n]) for n in others}}
    peers = sorted(nodes)
    listing = ConfigRecord({"nodes": peers, **{f: [keys[n][i] for n in peers] for i, f in
                                               enumerate(("pk1", "pk2", "signature", "cert"))}})
    reply = grid.send(me, E_SHARE_KEYS, RecordDict({STATE: listing}))
    refused(reply, "did not make")
    assert grid.contexts[me].state.config_records[state_key(EVALUATE)]["stage"] == "setup"


def test_a_site_never_reveals_its_own_mask_key_share_in_the_evaluation_session(nodes,
                                                                              adapter,
                                                                              refused):
    grid, cfg = AppGrid(nodes), _cfg(eval_release="secagg")
    _, shares = _open(grid, cfg, adapter, EVALUATE)
    content = _content(cfg, adapter)
    for node in nodes:  # stage 3, honestly: each site evaluates and sends its masked sum
        assert not grid.send(node, E_MASKED, _masked(content, shares[node])).has_error()
    survivors = sorted(nodes)
    signatures = {n: grid.send(n, E_CONSISTENCY, RecordDict({STATE: ConfigRecord(
        {"survivors": survivors})})).content.config_records[STATE]["signature"]
        for n in survivors}
    victim, *others = survivors
    reply = grid.send(victim, E_UNMASK, RecordDict({STATE: ConfigRecord({
        "survivors": survivors, "signers": survivors,
        "signatures": [signatures[n] for n in survivors], "active": others,
        "dead": [victim]})}))
    refused(reply, "own mask-key share")
    assert state_key(EVALUATE) in grid.contexts[victim].state.config_records  # secrets kept


# --- the fixed-point sum ---------------------------------------------------------------
def test_the_largest_sums_the_encoding_admits_do_not_wrap_the_modulus():
    tokens, bound = 2**40, 2.0**15  # loss × tokens × 2^16 = 2^71, just inside 72 bits
    metrics = {p.NUM_EXAMPLES: tokens, p.DOMAIN_LOSS: bound, p.DOMAIN_BASE_LOSS: 1e9,
               p.DOMAIN_ECE: 0.25}
    vector, clipped = encode_evaluation(metrics, bound)
    assert clipped == 1  # the base loss, clipped to the bound, not wrapped
    total = np.sum(np.stack([vector] * MAX_SITES), axis=0, dtype=np.uint32)  # mod 2^32
    result = decode_evaluation(total, MAX_SITES)
    assert (result.tokens, result.clipped) == (MAX_SITES * tokens, MAX_SITES)
    assert (result.loss, result.base_loss, result.ece) == (bound, bound, 0.25)
    with pytest.raises(UpdateRejected, match="does not fit"):
        encode_evaluation(metrics, 2.0**17)  # 2^73 would need a fourth limb
    assert LIMBS * LIMB_BITS == 72 and MAX_SITES * (2**LIMB_BITS - 1) < 2**32
