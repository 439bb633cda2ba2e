"""Secure aggregation end to end in a real Flower simulation, with DP-SGD at every site."""

from __future__ import annotations

import json
import shutil

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from secagg_grid import Sites

from fedcpt.client.app import secagg_masked, train
from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.adapters import adapter_state, to_arrays
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.secagg.params import SecAggParams
from fedcpt.privacy.secagg.server import MASKED, STATE
from fedcpt.runfolder.versions import list_versions
from fedcpt.simulations.runner import simulate
from fedcpt.tools.attestations import verify_run_version


@pytest.mark.slow  # a real simulation of its own, beside the shared DP one
@pytest.mark.smoke_run("dp")
def test_secagg_with_dp_runs_and_spends_exactly_what_dp_alone_spends(
        tmp_path, sites_config, smoke_dp_run):
    dp_cfg, dp_dir, dp_summary = smoke_dp_run
    # Each site's held-out split is salted with a secret drawn beside its ledger: the secure
    # run's sites keep the DP run's splits, so both train on the same units (same N and q).
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    for split in (dp_dir / "ledgers").glob("*.split.json"):
        shutil.copy(split, ledgers / split.name)
    cfg = load_config("smoke-secagg", config_file=sites_config,
                      overrides=[f"privacy.ledger_dir={ledgers}"])
    run_dir = tmp_path / "run"
    summary = simulate(cfg, run_dir)

    assert summary["secagg"]["enabled"] is True
    # one colluder tolerated by default: the threshold is ⌊(3+1)/2⌋+1 of 3 shares
    assert summary["secagg"]["num_shares"] == 3 and summary["secagg"]["threshold"] == 3
    assert summary["rounds_aggregated"] == cfg.federation.rounds
    assert summary["failures"] == 0
    assert dp_summary["secagg"] == {"enabled": False}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["update_norm_per_site"] == {} for r in rows)  # the server saw no update
    assert "## Secure aggregation" in (run_dir / "report.md").read_text()
    for site in summary["privacy"]["sites"]:
        secure = PrivacyLedger.load(ledgers / f"{site}.ledger.json")
        plain = PrivacyLedger.load(dp_dir / "ledgers" / f"{site}.ledger.json")
        assert secure.history == plain.history  # the same (σ, q, steps) every round
        assert secure.epsilon() == pytest.approx(plain.epsilon(), rel=1e-12)
    assert summary["privacy"]["max_epsilon"] == pytest.approx(
        dp_summary["privacy"]["max_epsilon"], rel=1e-12)
    # SecAgg+ changes how the updates travel, not what is learned: the two runs differ only
    # in their DP noise draws (OS randomness) and SecAgg's quantisation, so both adapt and
    # their final adaptations agree within that noise. 28 smoke-dp runs on this machine
    # adapted 0.009-0.043 nats (a spread of 4.7x), so the bound is a factor 5; a lost
    # aggregate (no adaptation at all) falls outside it.
    dp_rows = [json.loads(line) for line in (dp_dir / "metrics.jsonl").read_text()
               .splitlines()]
    base = rows[-1]["domain_secure"]["base_loss"]  # both runs hold out the same units
    secure_adapt, dp_adapt = base - rows[-1]["domain_loss"], base - dp_rows[-1]["domain_loss"]
    assert secure_adapt > 0 and dp_adapt > 0, (secure_adapt, dp_adapt)
    assert 1 / 5 < secure_adapt / dp_adapt < 5, (secure_adapt, dp_adapt)
    # every site attested every version it trained, verifiably against the simulated CA
    trained = [v for v in list_versions(run_dir) if v["sites"]]
    assert len(trained) == cfg.federation.rounds
    for version in trained:
        verdicts = verify_run_version(run_dir, version["round"])
        assert [v.status for v in verdicts] == ["verified"] * len(version["sites"]), verdicts


@pytest.mark.usefixtures("flower_task")
def test_a_site_requiring_secagg_refuses_a_plain_training_message(sites_config, site_refusal):
    cfg = load_config("smoke", config_file=sites_config)
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    msg = Message(RecordDict({
        p.ARRAYS: to_arrays(adapter_state(lm.model)),
        p.CONFIG: ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: "r",
                                p.SERVER_ROUND: 1})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "require-secagg": "true"})
    reply = train(msg, context)
    site_refusal(reply, "requires secure aggregation")  # no adapter leaves the site


@pytest.mark.slow  # a shared smoke run (tests/conftest.py:SMOKE_RUNS, one engine start)
@pytest.mark.smoke_run("user-level-secagg")
def test_site_level_dp_under_secagg_is_added_by_the_sites(smoke_runs):
    run = smoke_runs["user-level-secagg"]
    cfg, run_dir, summary = run.cfg, run.run_dir, run.summary
    assert cfg.secagg.mode == "on" and cfg.privacy.user_level
    assert cfg.privacy.user_noise_multiplier == 0.5

    assert summary["rounds_aggregated"] == cfg.federation.rounds
    assert summary["failures"] == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["update_norm_per_site"] == {} for r in rows)  # the server saw only sums
    user = summary["privacy_user_level"]
    assert "distributed discrete Gaussian" in user["mechanism"]
    central = epsilon([(0.5, 1.0, cfg.federation.rounds)], user["delta"], "rdp")
    assert central * 0.99 <= user["epsilon"] <= central * 1.05  # never below the central ε
    assert "the sites added" in (run_dir / "report.md").read_text()


@pytest.mark.usefixtures("flower_task")
def test_a_site_refusing_to_mask_does_not_send_its_update_norm(sites_config, site_refusal):
    cfg = load_config("smoke", config_file=sites_config, overrides=[
        "secagg.mode=on", "federation.max_update_norm=1e-9"])  # any trained update exceeds
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    arrays = to_arrays(adapter_state(lm.model))
    config = ConfigRecord({p.RUN_CONFIG: cfg.to_json(), p.RUN_ID: "r", p.SERVER_ROUND: 1})
    nodes = [7, 8, 9]
    sites = Sites(nodes, SecAggParams.for_round(cfg, 3), arrays, config)
    keys = {n: sites.setup(n) for n in nodes}
    sealed = {n: sites.share_keys(n, Sites.key_list(keys, nodes)) for n in nodes}
    inbound = ConfigRecord({"src": [8, 9], "sealed": [
        sealed[s]["sealed"][list(sealed[s]["dst"]).index(7)] for s in (8, 9)]})
    context = sites.contexts[7]
    context.node_config = {"partition-id": 0}
    msg = Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: config, STATE: inbound}),
                  dst_node_id=7, message_type=MASKED)
    reply = secagg_masked(msg, context)
    site_refusal(reply, r"update norm [0-9.]+ exceeds the bound 1e-09; not sent")  # its log
    assert reply.error.reason == ("site partition 0: refused: a check at the site failed; "
                                  "nothing was sent (the reason is in the site's own log)")
