"""The site's privacy policy: set at the site, tightened (never loosened) by the server,
with who set each value; the held-out split it fixes; what its evaluation releases."""

from __future__ import annotations

from dataclasses import replace

import pytest

import fedcpt.client.app as client_app
from fedcpt.config import SiteConfig, SitePolicySettings, load_config
from fedcpt.core.data import heldout_by_hash
from fedcpt.core.model import load_adapted_model
from fedcpt.exceptions import ConfigError
from fedcpt.privacy.heldout import HeldoutSplit, SplitError, share_splits
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.policy import (
    DP_BY_DEFAULT,
    PolicyRefused,
    accept_proposal,
    check_inputs,
    site_policy,
)
from fedcpt.privacy.report import site_row
from fedcpt.testing.bad_inputs.proposals import _hostile, _site_data
from fedcpt.testing.site_round import site_context, task_identity, train_message

SITE = SiteConfig(name="clinic", data=("/data",))
DEPLOYED = {"site-name": "clinic", "data-path": "/data"}


def deployed(**keys) -> dict:
    return {**DEPLOYED, **{k.replace("_", "-"): v for k, v in keys.items()}}


def test_defaults_are_the_sites_and_say_so():
    policy = site_policy(None, SITE, DEPLOYED, deployed=True)
    assert (policy.unit, policy.epsilon_budget, policy.eval_release) == ("document", 8.0,
                                                                          "plain")
    assert policy.who("unit") == "site default"
    assert policy.delta_for(100) == 1e-5  # min(1e-5, 1/(10·N))
    assert policy.delta_for(1_000_000) == pytest.approx(1e-7)
    assert any(line.startswith("policy unit: document [site default]")
               for line in policy.lines())


def test_node_config_then_policy_file_then_defaults(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('privacy-unit = "field:patient_id"\ndelta = 1e-7\nepsilon-budget = 2.0\n')
    policy = site_policy(None, SITE, deployed(policy_file=str(path),
                                                     epsilon_budget=4.0), deployed=True)
    assert policy.unit == "field:patient_id" and policy.delta == 1e-7
    assert policy.epsilon_budget == 4.0 and policy.who("epsilon_budget") == "site node config"
    assert policy.who("delta") == f"site policy file {path}"


def test_a_deployed_site_ignores_the_servers_simulation_tables():
    cfg = replace(load_config("smoke"),
                  site_policy=SitePolicySettings(epsilon_budget=100.0, unit="passage"))
    policy = site_policy(cfg, SITE, DEPLOYED, deployed=True)
    assert policy.epsilon_budget == 8.0 and policy.unit == "document"


def test_simulated_site_table_then_scenario_default():
    cfg = replace(load_config("smoke"),
                  site_policy=SitePolicySettings(unit="passage", epsilon_budget=3.0))
    site = replace(SITE, policy=SitePolicySettings(epsilon_budget=2.0))
    policy = site_policy(cfg, site, {"partition-id": 0}, deployed=False)
    assert policy.unit == "passage" and policy.who("unit") == "simulation default [site_policy]"
    assert policy.epsilon_budget == 2.0 and "[sites.policy]" in policy.who("epsilon_budget")


def test_require_dp_releases_nothing_unnoised_by_default():
    policy = site_policy(None, SITE, deployed(require_dp=True), deployed=True)
    assert policy.eval_release == "nothing"
    assert "require-dp" in policy.who("eval_release")


@pytest.mark.parametrize(("keys", "dp"), [
    ({}, False),  # no budget, no ledger: the run decides (and DP cannot run without a ledger)
    ({"epsilon_budget": 4.0}, True),
    ({"ledger_path": "/var/lib/fedcpt/clinic.ledger.json"}, True),
    ({"ledger_path": "/var/lib/fedcpt/clinic.ledger.json", "require_dp": "false"}, False),
])
def test_a_site_with_a_budget_or_ledger_has_dp_on_by_default(keys, dp):
    """Issue 25, attack 3: the server cannot switch DP off at a site that keeps a budget
    or a ledger; only the site's own ``require-dp = false`` does."""
    policy = site_policy(None, SITE, deployed(**keys), deployed=True)
    assert policy.require_dp is dp
    if dp:
        assert policy.who("require_dp") == DP_BY_DEFAULT
        assert policy.eval_release == "nothing"  # nothing un-noised by default either
    elif "require_dp" in keys:
        assert policy.who("require_dp") == "site node config"


@pytest.mark.parametrize(("keys", "match"), [
    ({"privacy_unit": "person"}, r"privacy unit 'person' is not one of .*site node config"),
    ({"eval_release": "summed"}, r"`eval_release` must be one of .*'secagg'.*secure aggregation"),
    ({"heldout_fraction": 0.0}, r"`heldout_fraction` must be strictly between 0 and 1"),
    ({"epsilon_budget": "lots"}, r"sets `epsilon_budget` to 'lots', which is not a float"),
    ({"block_sizes": "64,6"}, r"`block_sizes` must be a non-empty list of sizes, each at "
                              r"least 8, got \(64, 6\) \(site node config\)"),
    ({"block_sizes": "64,big"}, r"sets `block_sizes` to a list holding 'big', which is not a "
                                r"whole number"),
    ({"allowed_models": " , "}, r"`models` must be a non-empty list of model ids or paths"),
    ({"text_fields": ""}, r"`text_fields` must be a non-empty list of column names"),
    ({"train_share": 0}, r"`train_share` must be in \(0, 1\]"),
    ({"site_level_epsilon_budget": -1}, r"`site_level_epsilon_budget` must be >= 0 "
                                        r"\(0: counted, not capped\), got -1.0"),
])
def test_bad_site_policy_fails_naming_the_key(keys, match):
    with pytest.raises(ConfigError, match=match):
        site_policy(None, SITE, deployed(**keys), deployed=True)


def test_what_a_site_reads_and_opens_is_its_own_unless_it_is_simulated():
    policy = site_policy(None, SITE, deployed(text_fields="body, text", block_sizes="128",
                                              allowed_models="/models/llama"), deployed=True)
    assert (policy.text_fields, policy.block_sizes, policy.models) == (
        ("body", "text"), (128,), ("/models/llama",))
    assert policy.who("models") == "site node config"
    default = site_policy(None, SITE, DEPLOYED, deployed=True)
    assert default.models == ("smollm2-135m-instruct", "tiny-llama")  # no path is opened
    assert (default.text_fields, default.train_share) == (("text",), 1.0)
    cfg = load_config("smoke", overrides=["data.text_field=body", "model.name=/models/m"])
    simulated = site_policy(cfg, SITE, {"partition-id": 0}, deployed=False)
    assert (simulated.text_fields, simulated.block_sizes, simulated.models) == (
        ("body",), (64,), ("/models/m",))
    assert simulated.who("models") == "simulation: the run's model.name"
    assert simulated.train_share == 0.8  # smoke's [site_policy] cap


def test_delta_at_or_above_one_over_n_is_refused():
    policy = site_policy(None, SITE, deployed(delta=0.01), deployed=True)
    assert policy.delta_for(50) == 0.01
    with pytest.raises(ConfigError, match=r"δ=0.01 \(site node config\) is at least 1/N = 1/100"):
        policy.delta_for(100)


def test_stricter_proposals_tighten_looser_ones_are_refused_naming_the_key():
    policy = site_policy(None, SITE, DEPLOYED, deployed=True)
    cfg = load_config("smoke-dp", overrides=["privacy.target_delta=1e-8",
                                             "privacy.target_epsilon=2"])
    terms = accept_proposal(policy, cfg, units=1000)
    assert (terms.delta, terms.epsilon_budget) == (1e-8, 2.0)
    for override, key in (("privacy.target_delta=0.2", "privacy.target_delta"),
                          ("privacy.target_epsilon=9", "privacy.target_epsilon")):
        with pytest.raises(PolicyRefused, match=f"refuses `{key}`.*site default"):
            accept_proposal(policy, load_config("smoke-dp", overrides=[override]), 1000)
    loosened = load_config("smoke-dp", overrides=["data.heldout_fraction=0.5"])
    with pytest.raises(PolicyRefused, match="refuses `data.heldout_fraction`.*site default"):
        check_inputs(policy, loosened.data, loosened.model)  # before any data is read


def test_a_stricter_delta_is_accepted_for_its_run_and_the_ledger_keeps_the_sites(tmp_path):
    # the same hostile-server harness as the bad-input catalogue, with an honest proposal
    answer = _hostile(["privacy.target_delta=1e-9"])(tmp_path)
    assert answer == "accepted: the ledger changed (train)"
    ledger = PrivacyLedger.load(tmp_path / "clinic.ledger.json")
    assert ledger.delta == 1e-5 and ledger.unit == "field:user_id"  # min(1e-5, 1/(10·N))


def test_a_server_named_ledger_folder_does_not_move_a_sites_own_ledger(tmp_path):
    elsewhere = tmp_path / "server-chosen"
    answer = _hostile([f"privacy.ledger_dir={elsewhere}"])(tmp_path)
    assert answer == "accepted: the ledger changed (train)"  # spent in the site's own ledger
    assert PrivacyLedger.load(tmp_path / "clinic.ledger.json").epsilon() > 0
    assert not elsewhere.exists()  # and nothing where the server pointed


# --- the held-out split ---------------------------------------------------------------

def test_a_unit_once_trained_on_is_never_held_out(tmp_path):
    keys = [f"field:user_id=u{i}" for i in range(300)]
    split = HeldoutSplit.open(tmp_path / "s.split.json", "clinic", "field:user_id")
    first = split.rule(0.1)(keys)
    # the site later raises its fraction and adds units: recorded sides do not move
    again = HeldoutSplit.open(tmp_path / "s.split.json", "clinic", "field:user_id")
    assert again.salt == split.salt
    more = keys + [f"field:user_id=n{i}" for i in range(300)]
    second = again.rule(0.9)(more)
    assert second[:300] == first
    assert sum(second[300:]) > 200  # new units follow the new fraction
    assert first != heldout_by_hash(0.1)(keys)  # the secret salt moved the split
    text = (tmp_path / "s.split.json").read_text()
    assert "u17" not in text  # only salted digests are stored


def test_a_shared_split_holds_out_the_same_units_and_never_replaces_another(tmp_path):
    keys = [f"field:user_id=u{i}" for i in range(300)]
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    first.mkdir()
    held = HeldoutSplit.open(first / "clinic.split.json", "clinic", "field:user_id").rule(
        0.1)(keys)
    assert [c.name for c in share_splits(first, second)] == ["clinic.split.json"]
    shared = HeldoutSplit.open(second / "clinic.split.json", "clinic", "field:user_id")
    assert shared.rule(0.1)(keys) == held  # the same salt: the same units held out
    assert share_splits(first, second)  # copying the same record again is harmless
    third.mkdir()  # a folder whose ledger already has its own split
    HeldoutSplit.open(third / "clinic.split.json", "clinic", "field:user_id").rule(0.1)(keys)
    before = (third / "clinic.split.json").read_bytes()
    with pytest.raises(SplitError, match="already holds another held-out split"):
        share_splits(first, third)
    assert (third / "clinic.split.json").read_bytes() == before


# --- evaluation releases ----------------------------------------------------------------

def _evaluate(tmp_path, **policy):
    # The salted split holds Binomial(40, 0.5) users back: fewer than the query's 8 with
    # probability 2e-5 (at 0.3 it was one run in 18, and the site rightly refused).
    cfg = load_config("smoke-dp")
    ledger_path = tmp_path / "clinic.ledger.json"
    context = site_context(str(_site_data(tmp_path)), ledger_path, name="clinic",
                           unit="field:user_id", **{"heldout-fraction": "0.5", **policy})
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity():
        reply = client_app.evaluate(train_message(cfg, "run-e", 1, initial), context)
    return reply, ledger_path


def test_release_nothing_returns_no_loss(tmp_path, site_refusal):
    reply, ledger_path = _evaluate(tmp_path, **{"eval-release": "nothing"})
    site_refusal(reply, "releases no evaluation")
    assert not ledger_path.exists()


def test_noised_release_spends_from_the_ledger_and_the_report_counts_it(tmp_path):
    reply, ledger_path = _evaluate(tmp_path, **{"eval-release": "noised"})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert {"domain-loss", "domain-base-loss", "domain-ece"} <= set(metrics.keys())
    ledger = PrivacyLedger.load(ledger_path)
    [entry] = ledger.entries
    assert (entry.kind, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        "eval", 4.0, 1.0, 3)  # loss, ECE and the base loss: three Gaussian releases
    row = site_row(ledger)
    assert row["epsilon"] == pytest.approx(ledger.epsilon()) and row["epsilon"] > 0
