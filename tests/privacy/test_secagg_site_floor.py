"""A malicious server against a site's floor on distributed DP.

Under secure aggregation the sites add the site-level noise themselves
(:mod:`fedcpt.privacy.secagg.ddp`), calibrated from the run config the server sends: the
noise multiplier z, whether site-level DP is on at all, and the fraction of sites assumed
to collude. A hostile server that lowers any of these lowers the noise in the sum it
unmasks. A site that sets ``min-user-noise-multiplier`` / ``min-dishonest-fraction`` in
its own node config refuses such a round at stage 3, before it trains, and sends nothing.

Each test plays the server: stages 1 and 2 run honestly through the real site functions,
then the real stage-3 handler (:func:`fedcpt.client.model_handlers.secagg_masked`) gets the
hostile proposal, committed in the round context as an honest-looking round would be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from secagg_grid import Sites

import fedcpt.client.app as client_app
from fedcpt.client import model_handlers
from fedcpt.config import SiteConfig, SitePolicySettings, load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.deploy.site_check import check_node_config
from fedcpt.exceptions import ConfigError, UpdateRejected
from fedcpt.privacy.ledger import LedgerError
from fedcpt.privacy.policy import PolicyRefused, check_site_level_dp, site_policy
from fedcpt.privacy.report import find_ledgers, find_site_level, write_privacy_report
from fedcpt.privacy.secagg import participation
from fedcpt.privacy.secagg import site as secagg_site
from fedcpt.privacy.secagg.ddp import MAX_GRID_INFLATION, DistributedDP
from fedcpt.privacy.secagg.encoding import vector_length
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED, STATE
from fedcpt.privacy.secagg.site_level_record import (
    MAX_DELTA,
    check_budget,
    load_releases,
    record_path,
    site_level_epsilon,
)
from fedcpt.testing.site_round import site_context, task_identity, train_message

A, B, C, D, E = NODES = (11, 22, 33, 44, 55)
FLOOR = {"min-user-noise-multiplier": "1.0", "min-dishonest-fraction": "0.2",
         "require-dp": "false"}  # no DP-SGD, by the site's own choice: site-level noise
HONEST = ["privacy.user_level=true", "privacy.user_noise_multiplier=1.0",
          "secagg.mode=on", "secagg.dishonest_fraction=0.2"]


def _no_check(ledger: Path) -> AbstractContextManager:
    return nullcontext()


def _stage_three(tmp_path, write_text, overrides: list[str], floor: dict[str, str] = FLOOR,
                 threshold: int = 0, run_id: str = "run-1", nodes: Sequence[int] = NODES,
                 participants: Sequence[int] | None = None,
                 around: Callable[[Path], AbstractContextManager] = _no_check,
                 ) -> tuple[Message, Context]:
    """Stages 1–2 run honestly for the sites ``nodes`` (five, A first) under the server's
    config (``HONEST`` with ``overrides``), its ``threshold`` (0: the default majority)
    and the ``participants`` it lists in the round context (default: ``nodes``); returns
    site A's reply to the real stage-3 handler, and A's context. A is a deployed site
    whose node config sets ``floor``; the handler runs inside ``around(A's ledger)`` (a
    refused round: ``unchanged_site_files``)."""
    cfg = load_config("smoke", overrides=[*HONEST, *overrides])
    adapter = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity():
        request = train_message(cfg, run_id, 1, adapter)
    config = request.content[p.CONFIG]
    params = SecAggParams.for_round(cfg, len(nodes))
    sites = Sites(nodes, replace(params, threshold=threshold or params.threshold), adapter,
                  config)
    ledger = tmp_path / "victim.ledger.json"
    victim = site_context(str(write_text("victim.txt", 40_000, seed=5)), ledger,
                          name="victim", **floor)
    sites.contexts[A] = victim
    setup = sites.round_record(nodes=participants or nodes)
    keys = {n: sites.setup(n, setup) for n in nodes}
    sealed = {n: sites.share_keys(n, Sites.key_list(keys, nodes)) for n in nodes}
    src = sorted(s for s in sealed if A in list(sealed[s]["dst"]))
    boxes = [sealed[s]["sealed"][list(sealed[s]["dst"]).index(A)] for s in src]
    shares = ConfigRecord({"src": src, "sealed": boxes})
    with task_identity(), around(ledger):
        msg = Message(RecordDict({p.ARRAYS: adapter, p.CONFIG: config,
                                  STATE: shares}), dst_node_id=A, message_type=MASKED)
        return model_handlers.secagg_masked(msg, victim), victim


@pytest.mark.parametrize(("overrides", "match"), [
    (["privacy.user_noise_multiplier=0.1"],
     r"refuses `privacy.user_noise_multiplier` = 0.1: below the site's floor 1 "
     r"\(min_user_noise_multiplier, site node config\)"),
    (["privacy.user_level=false"],
     r"refuses `privacy.user_level` = False: it adds its own site-level noise of at least "
     r"z = 1"),
    (["secagg.mode=off"], r"refuses `secagg.mode` = off"),
    (["secagg.dishonest_fraction=0"],
     r"refuses `secagg.dishonest_fraction` = 0: the site assumes at least 0.2 of the sites "
     r"collude \(min_dishonest_fraction, site node config\)"),
])
def test_a_server_proposing_less_noise_than_the_sites_floor_gets_nothing(
        tmp_path, write_text, overrides, match, site_refusal, unchanged_site_files):
    reply, victim = _stage_three(tmp_path, write_text, overrides, around=unchanged_site_files)
    site_refusal(reply, match)
    # nothing was masked or sent, and the site will sign no survivor set for this round
    state = victim.state.config_records[STATE]
    assert state["stage"] == "receive_shares"
    with pytest.raises(UpdateRejected, match="out of order"):
        secagg_site.consistency(victim, ConfigRecord({"survivors": list(NODES)}), None)


def test_a_site_assuming_colluders_refuses_a_threshold_they_could_beat(
        tmp_path, write_text, site_refusal, unchanged_site_files):
    """With 5 neighbours a majority threshold is 3, which one colluding site beats
    (tests/privacy/test_secagg_collusion.py unmasks a victim at exactly that setting). A
    site that assumes one colluder masks nothing under it; at threshold 4, which one
    colluder cannot beat, it trains and sends its masked update."""
    floor = {**FLOOR, "secagg-colluders": "1"}
    reply, victim = _stage_three(tmp_path, write_text, [], floor, threshold=3,
                                 around=unchanged_site_files)
    site_refusal(reply, r"refuses `secagg.reconstruction_threshold` = 3 over 5 neighbours: "
                        r"the server with 1 colluding site\(s\) \(secagg_colluders, site "
                        r"node config\) could unmask this site's update; it needs at least 4")
    assert victim.state.config_records[STATE]["stage"] == "receive_shares"
    with pytest.raises(UpdateRejected, match="out of order"):  # and it signs no survivors
        secagg_site.consistency(victim, ConfigRecord({"survivors": list(NODES)}), None)
    reply, victim = _stage_three(tmp_path, write_text, [], floor, threshold=4)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert victim.state.config_records[STATE]["stage"] == "mask"


def test_a_proposal_at_the_sites_floor_trains_and_sends_its_masked_update(tmp_path,
                                                                          write_text):
    reply, victim = _stage_three(tmp_path, write_text, [])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert p.MASKED_VECTOR in reply.content[p.MASKED]
    assert victim.state.config_records[STATE]["stage"] == "mask"


def _honest_ddp() -> DistributedDP:
    """The site-level mechanism of the honest round (``HONEST``) over the five sites."""
    cfg = load_config("smoke", overrides=HONEST)
    params = SecAggParams.for_round(cfg, len(NODES))
    adapter = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    return DistributedDP.for_config(cfg, params.threshold, len(NODES),
                                    vector_length(adapter) - 1)


def test_a_server_repeating_the_round_under_new_run_ids_is_counted_by_the_site(
        tmp_path, write_text):
    """The run's summary counts its own rounds; a server that re-sends round 1 under three
    run ids, each from another adapter (the site answers each adapter once), gets three
    noised updates of the same site. The site records each before it leaves, beside its
    ledger, and its privacy report composes all three, though this site (site-level noise,
    no DP-SGD) keeps no unit-level ledger."""
    for seed, run_id in enumerate(("run-1", "run-2", "run-3")):
        reply, _ = _stage_three(tmp_path, write_text, [f"seed={seed}"], run_id=run_id)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    releases = load_releases(record_path(tmp_path / "victim.ledger.json"))
    assert [(r.run, r.server_round) for r in releases] == [
        ("run-1", 1), ("run-2", 1), ("run-3", 1)]
    cfg, ddp = load_config("smoke", overrides=HONEST), _honest_ddp()
    eps, delta = site_level_epsilon(releases)
    assert delta == cfg.privacy.user_delta
    assert eps == pytest.approx(ddp.epsilon(3, delta), rel=1e-9)
    assert eps > ddp.epsilon(1, delta)  # what one run's summary would state
    counted = find_site_level(tmp_path)
    assert counted == {"victim": {"releases": 3, "runs": 3, "epsilon": pytest.approx(eps),
                                  "delta": delta}}
    assert find_ledgers(tmp_path, required=False) == []
    payload = write_privacy_report([], tmp_path / "report", counted)
    assert payload["max_epsilon"] is None and payload["site_level"] == counted
    assert f"| victim | 3 | 3 | {eps:.3f} | 1e-05 |" in (
        tmp_path / "report" / "privacy_report.md").read_text()


def test_a_site_with_a_site_level_budget_refuses_the_release_that_would_pass_it(
        tmp_path, write_text, site_refusal, unchanged_site_files):
    """The server re-sends round 1 under new run ids to a site that caps its site-level ε
    between what two and three releases compose to. It gets two; the third is refused
    before training, nothing is masked, and the site's record is byte-for-byte unchanged."""
    ddp = _honest_ddp()
    delta = load_config("smoke", overrides=HONEST).privacy.user_delta
    budget = (ddp.epsilon(2, delta) + ddp.epsilon(3, delta)) / 2
    floor = {**FLOOR, "site-level-epsilon-budget": f"{budget:.6f}"}
    for seed, run_id in enumerate(("run-1", "run-2")):
        reply, _ = _stage_three(tmp_path, write_text, [f"seed={seed}"], floor, run_id=run_id)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    record = record_path(tmp_path / "victim.ledger.json")
    before = record.read_bytes()
    reply, victim = _stage_three(tmp_path, write_text, ["seed=2"], floor, run_id="run-3",
                                 around=unchanged_site_files)
    site_refusal(reply, rf"refuses site-level release 3: its site-level ε would reach "
                        rf"{ddp.epsilon(3, delta):.3f} at δ=1e-05, over its budget "
                        rf"{float(floor['site-level-epsilon-budget']):g} "
                        r"\(site_level_epsilon_budget, site node config\)")
    assert record.read_bytes() == before
    assert victim.state.config_records[STATE]["stage"] == "receive_shares"  # nothing masked


def test_a_site_level_budget_without_a_ledger_location_refuses_every_release():
    """A cap the site cannot count against is never met: it refuses rather than send."""
    policy = site_policy(None, SiteConfig(name="victim", data=("/data",)),
                         {**FLOOR, "site-level-epsilon-budget": "100"}, deployed=True)
    assert policy.who("site_level_epsilon_budget") == "site node config"
    with pytest.raises(PolicyRefused, match=r"caps its site-level ε at 100 .*keeps no "
                                            r"ledger location"):
        check_budget(policy, "run-1", 1, _honest_ddp(), 1e-5)


def test_a_server_stating_a_loose_site_level_delta_is_recorded_at_the_default(tmp_path,
                                                                              write_text):
    reply, _ = _stage_three(tmp_path, write_text, ["privacy.user_delta=0.5"])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    [release] = load_releases(record_path(tmp_path / "victim.ledger.json"))
    assert release.delta == MAX_DELTA


@pytest.mark.parametrize(("overrides", "match"), [
    (["privacy.user_level=true", "secagg.mode=off"],
     r"refuses `secagg.mode` = off: .*does not leave that noise to the server"),
    ([], r"refuses `privacy.user_level` = False"),
])
def test_a_site_with_a_floor_refuses_plain_rounds(tmp_path, write_text, overrides, match,
                                                   site_refusal, unchanged_site_files):
    """Without SecAgg the server would add the site-level noise (or none): a site with a
    floor does not train."""
    cfg = load_config("smoke", overrides=overrides)
    ledger = tmp_path / "victim.ledger.json"
    context = site_context(str(write_text("victim.txt", 40_000, seed=5)), ledger,
                           name="victim", **FLOOR)
    adapter = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity(), unchanged_site_files(ledger):
        reply = client_app.train(train_message(cfg, "run-1", 1, adapter), context)
    site_refusal(reply, match)


def test_the_floor_is_the_sites_own_and_says_who_set_it():
    node = {"site-name": "clinic", "data-path": "/data", **FLOOR}
    lines = check_node_config(node)  # what `fedcpt site check` prints
    assert "policy min_user_noise_multiplier: 1.0 [site node config]" in lines
    assert "policy min_dishonest_fraction: 0.2 [site node config]" in lines
    unset = check_node_config({"site-name": "clinic", "data-path": "/data"})
    assert "policy min_user_noise_multiplier: 0.0 [site default]" in unset
    assert any(line.startswith("policy secagg_colluders: 1 (") for line in unset)
    with pytest.raises(ConfigError, match=r"`secagg_colluders` must be >= 0, got -1"):
        check_node_config({**node, "secagg-colluders": "-1"})
    with pytest.raises(ConfigError, match=r"`min_dishonest_fraction` must be in \[0, 1\), "
                                          r"got 1.5 \(site node config\)"):
        check_node_config({**node, "min-dishonest-fraction": "1.5"})
    # a deployed site never takes the floor from the server's simulation tables
    cfg = replace(load_config("smoke"),
                  site_policy=SitePolicySettings(min_user_noise_multiplier=0.01))
    site = SiteConfig(name="clinic", data=("/data",))
    assert site_policy(cfg, site, node, deployed=True).min_user_noise_multiplier == 1.0


def test_a_simulated_site_takes_its_floor_from_the_site_policy_tables():
    cfg = replace(load_config("smoke"),
                  site_policy=SitePolicySettings(min_user_noise_multiplier=2.0))
    site = replace(cfg.sites[0], policy=SitePolicySettings(min_dishonest_fraction=0.3))
    policy = site_policy(cfg, site, {"partition-id": 0}, deployed=False)
    assert policy.min_user_noise_multiplier == 2.0
    assert policy.who("min_user_noise_multiplier") == "simulation default [site_policy]"
    assert policy.min_dishonest_fraction == 0.3
    assert "[sites.policy]" in policy.who("min_dishonest_fraction")
    with pytest.raises(ConfigError, match="policy.min_dishonest_fraction"):
        SitePolicySettings(min_dishonest_fraction=1.0)
    with pytest.raises(ConfigError, match="policy.secagg_colluders"):
        SitePolicySettings(secagg_colluders=-2)


def test_fake_participants_that_coarsen_the_noise_grid_are_refused():
    """A hostile server lists 10^8 participant ids (fakes beside the real five) with the
    honest z = 1. The grid the site rounds onto shrinks with the participant count, so
    rounding raises the sensitivity 2.4-fold and the round's ε nearly triples, while z
    still meets the site's floor. The site's check of the mechanism stage 3 builds from
    the round's participant list (:func:`fedcpt.client.model_handlers.secagg_masked`) refuses it;
    the honest round's grid passes. (The attack through that handler: the next test.)"""
    node = {"site-name": "victim", "data-path": "/data", "min-user-noise-multiplier": "1.0"}
    policy = site_policy(None, SiteConfig(name="victim", data=("/data",)), node,
                         deployed=True)
    cfg = load_config("smoke", overrides=[*HONEST, "secagg.dishonest_fraction=0",
                                          "secagg.quantization_range=2"])
    adapter = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    dimension = vector_length(adapter) - 1
    honest = DistributedDP.for_config(cfg, 3, len(NODES), dimension)
    check_site_level_dp(policy, cfg, honest)  # the honest round passes
    faked = DistributedDP.for_config(cfg, 3, 10**8, dimension)
    assert faked.noise_multiplier >= policy.min_user_noise_multiplier  # z meets the floor
    assert faked.epsilon(1, 1e-5) > 2.5 * honest.epsilon(1, 1e-5)  # what the fakes buy
    with pytest.raises(PolicyRefused, match=r"refuses the round's noise grid: 100000000 "
                                            r"participants leave 10 grid steps"):
        check_site_level_dp(policy, cfg, faked)


GRID_FLOOR = {"min-user-noise-multiplier": "1.0", "require-dp": "false"}
COARSE = ["secagg.dishonest_fraction=0", "secagg.quantization_range=2"]
FAKED = 6_500_000  # participant ids in all; the site's bound here is about 5.95 million
REAL = (A, B, C)  # three real sites, threshold 3: every site checks the fakes at setup


def test_fake_participants_refused_by_the_real_stage_three_handler(
        tmp_path, write_text, site_refusal, unchanged_site_files):
    """The same attack against the real site: stages 1–2 run honestly for three real sites
    under a round context that lists ``FAKED`` participant ids (the three among them), and
    the real stage-3 handler gets the round. The site, with records from an honest round
    of the three, refuses before it trains (its own grid check, in its log): nothing is
    masked and every file beside its ledger is byte for byte unchanged."""
    ledger = tmp_path / "victim.ledger.json"
    reply, _ = _stage_three(tmp_path, write_text, [*COARSE, "seed=1"], GRID_FLOOR,
                            run_id="run-0", nodes=REAL)  # the honest round
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert record_path(ledger).exists() and participation.record_path(ledger).exists()
    fakes = [*REAL, *range(1000, 1000 + FAKED - len(REAL))]
    reply, victim = _stage_three(tmp_path, write_text, COARSE, GRID_FLOOR, nodes=REAL,
                                 participants=fakes, around=unchanged_site_files)
    site_refusal(reply, rf"refuses the round's noise grid: {FAKED} participants leave "
                        r"\d+ grid steps for the clipping norm, and rounding onto them raises "
                        rf"the sensitivity [0-9.]+-fold \(at most {MAX_GRID_INFLATION:g}\)")
    assert victim.state.config_records[STATE]["stage"] == "receive_shares"  # nothing masked
    assert len(victim.state.config_records[STATE]["participants"]) == FAKED


def test_a_default_site_assumes_one_colluder_and_the_default_threshold_meets_it(
        tmp_path, write_text, site_refusal, unchanged_site_files):
    """With one colluding site, a server unmasks a victim at a majority threshold (3 of 5,
    test_secagg_collusion.py). A site that set nothing refuses that threshold, saying
    which colluder assumption refused it, and its records from an earlier run are byte for
    byte unchanged; the server's default threshold (4 of 5) passes."""
    ledger = tmp_path / "victim.ledger.json"
    reply, _ = _stage_three(tmp_path, write_text, ["seed=1"], floor={"require-dp": "false"},
                            run_id="run-0")  # an earlier release: records beside its ledger
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert record_path(ledger).exists() and participation.record_path(ledger).exists()
    reply, victim = _stage_three(tmp_path, write_text, [], floor={}, threshold=3,
                                 around=unchanged_site_files)
    site_refusal(reply, r"refuses `secagg.reconstruction_threshold` = 3 over 5 neighbours: the "
                        r"server with 1 colluding site\(s\) \(secagg_colluders, site default\)")
    assert victim.state.config_records[STATE]["stage"] == "receive_shares"  # nothing masked
    cfg = load_config("smoke", overrides=HONEST)
    assert SecAggParams.for_round(cfg, len(NODES)).threshold == 4
    # a site with a ledger requires DP by default; this run has none, so it opts out
    reply, victim = _stage_three(tmp_path, write_text, [], floor={"require-dp": "false"})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    lines = check_node_config({"site-name": "clinic", "data-path": "/data"})
    assert ("policy secagg_colluders: 1 (assumes up to 1 other site(s) collude with the "
            "server: masks only under a threshold t with 2t > n + 1 over its n neighbours) "
            "[site default]") in lines


def test_a_damaged_site_level_record_stops_the_release_with_a_clear_error(tmp_path):
    """A site whose record of its site-level releases cannot be read sends no further
    release: the count it would compose is unknown (the handler then refuses, generically)."""
    record = record_path(tmp_path / "victim.ledger.json")
    record.write_text("{not json", encoding="utf-8")
    with pytest.raises(LedgerError, match=r"site-level record .*victim\.site-level\.json is "
                                          r"damaged.*sends no site-level release"):
        load_releases(record)
