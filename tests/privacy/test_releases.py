"""Everything a DP site's real replies carry is accounted for in the privacy report's
release list, which is the release gate's own table (:data:`fedcpt.privacy.gate.GATE`): a
key a reply gains without a line there is dropped by the gate, and fails here."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from secagg_grid import AppGrid, secagg_federation, simulated_sites

import fedcpt.client.app as client_app
from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.deploy.certs import write_federation_certs
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.report import released_keys, site_row
from fedcpt.server.round_loop import site_evaluations
from fedcpt.testing.bad_inputs.proposals import _site_data
from fedcpt.testing.site_round import site_context, task_identity, train_message


def reply_keys(reply: Message) -> set[str]:
    """The names a reply carries: its records, and the keys of its metric and config
    records (an adapter's tensor names are the update itself)."""
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content: RecordDict = reply.content
    keys = set(content.keys())
    for record in (*content.metric_records.values(), *content.config_records.values()):
        keys |= set(record.keys())
    return keys


@pytest.fixture
def dp_site(tmp_path):
    """A deployed DP site (unit: user_id) that releases noised evaluations, and the
    smoke-dp run's initial adapter."""
    cfg = load_config("smoke-dp", overrides=["privacy.noise_multiplier=1.0"])  # no planning
    ledger = tmp_path / "clinic.ledger.json"
    key, cert = write_federation_certs(tmp_path / "fed", ["127.0.0.1"], ["clinic"],
                                       days=2).signing["clinic"]
    identity = {"ca-cert": str(tmp_path / "fed" / "ca.crt"), "secagg-key": str(key),
                "secagg-cert": str(cert)}  # so that its replies carry an attestation
    context = site_context(str(_site_data(tmp_path)), ledger, name="clinic",
                           unit="field:user_id", **{"heldout-fraction": "0.5",
                                                    "eval-release": "noised", **identity})
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    return cfg, context, ledger, initial


def test_every_key_of_a_dp_sites_replies_is_in_the_reports_release_list(dp_site):
    cfg, context, ledger_path, initial = dp_site
    with task_identity():
        trained = client_app.train(train_message(cfg, "run-r", 1, initial), context)
        evaluated = client_app.evaluate(train_message(cfg, "run-r", 1, initial), context)
        query = client_app.query(Message(RecordDict({p.CONFIG: ConfigRecord(
            {p.RUN_CONFIG: cfg.to_json()})}), dst_node_id=1, message_type="query"), context)
    ledger = PrivacyLedger.load(ledger_path)
    listed = released_keys(site_row(ledger)["policy"]["eval_release"]["value"])
    for reply in (trained, evaluated, query):
        assert reply_keys(reply) <= listed, sorted(reply_keys(reply) - listed)
    assert p.ATTESTATION in trained.content
    metrics = trained.content[p.METRICS]
    assert metrics[p.TRAIN_SECONDS] == 0.0  # it would time the Poisson batches
    assert p.TRAIN_LOSS not in metrics  # computed on the protected units
    assert metrics[p.NUM_EXAMPLES] == cfg.train.local_steps * cfg.train.batch_size
    assert not set(p.PRIVACY_METRICS) & set(metrics.keys())  # they reveal N (q = batch / N)


def test_every_key_of_the_masked_evaluation_replies_is_in_the_release_list(tmp_path):
    """Under secure aggregation with ``eval-release=secagg`` the sites' replies (keys,
    shares, signatures and the masked evaluation) carry only listed keys, and the list has
    no per-site loss for such a site."""
    cfg = load_config("smoke", overrides=["secagg.mode=on", "site_policy.eval_release=secagg"])
    grid = AppGrid(simulated_sites(tmp_path, [s.name for s in cfg.sites]))
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity():
        [secure] = site_evaluations(secagg_federation(grid, cfg), 1, initial)
    assert secure.summed_sites == 3
    assert sum(p.MASKED in r.content for r in grid.replies) == 3  # the masked evaluations
    listed = released_keys("secagg")
    for reply in grid.replies:
        assert reply_keys(reply) <= listed, sorted(reply_keys(reply) - listed)
    assert not {p.DOMAIN_LOSS, p.DOMAIN_BASE_LOSS, p.DOMAIN_ECE} & listed


def test_a_key_without_a_statement_is_not_listed():
    """The check above can fail: a quantity nobody wrote a line for is not in the list, and
    evaluation keys are listed only when the policy releases an evaluation."""
    assert "train-tokens" not in released_keys("noised")
    assert p.DOMAIN_LOSS in released_keys("plain")
    assert p.DOMAIN_LOSS not in released_keys("nothing")
