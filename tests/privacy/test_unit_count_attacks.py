"""A hostile server reads a site's number of training units N from its DP training reply
(issue 25: "N is still revealed"), run as the attacker would run it against the real
site handler.

N is the site's own: how many patients, users or documents it trains on. Before this
change a DP-SGD reply carried the site's accounting in the clear, and each piece gave N:
q = batch / N directly; ε (with σ, δ and the step count beside it) by inverting the
accountant; σ alone by replaying the site's noise plan; and the signed attestation stated
N (so did the default δ = 1/(10·N) above 10⁴ units). Now the reply carries none of them,
and two sites that differ only in N send the same clear values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from user_notes import user_notes

import fedcpt.client.app as client_app
from fedcpt.config import RunConfig, load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.deploy.certs import write_federation_certs
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.attestation import Attestation, policy_digest
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.policy import default_delta
from fedcpt.testing.site_round import site_context, task_identity, train_message

RUN = "run-n"
BUDGET = 8.0  # the site's default ε budget, which smoke-dp also proposes
SITES = {"clinic": 40, "ward": 25}  # users per site: the same policy, different N


def _reply(tmp_path: Path, cfg: RunConfig, site: str, users: int, identity: dict[str, str]):
    """The site's real train handler's reply to round 1 of a DP run, and its ledger."""
    ledger = tmp_path / f"{site}.ledger.json"
    context = site_context(str(user_notes(tmp_path, users)), ledger, name=site,
                           unit="field:user_id", **identity, **{"heldout-fraction": "0.3"})
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity():
        reply = client_app.train(train_message(cfg, RUN, 1, initial), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply, PrivacyLedger.load(ledger)


@pytest.fixture(scope="module")
def replies(tmp_path_factory):
    """Each site's reply and its own ledger (the truth: q = batch / N in its entry)."""
    tmp = tmp_path_factory.mktemp("unit-count")
    certs = write_federation_certs(tmp / "fed", ["127.0.0.1"], list(SITES), days=2)
    cfg = load_config("smoke-dp")
    assert cfg.privacy.noise_multiplier == 0  # σ is planned by the site from its budget
    out = {}
    for site, users in SITES.items():
        key, cert = certs.signing[site]
        identity = {"ca-cert": str(certs.ca_cert), "secagg-key": str(key),
                    "secagg-cert": str(cert)}
        out[site] = _reply(tmp, cfg, site, users, identity)
    return cfg, out


def _true_n(ledger: PrivacyLedger, cfg: RunConfig) -> int:
    [entry] = ledger.entries
    return round(cfg.train.batch_size / entry.sample_rate)


# --- the attacker's readings of one reply ------------------------------------------------
def _metrics(reply) -> dict[str, float]:
    return dict(reply.content.metric_records[p.METRICS])


def n_from_sample_rate(metrics: dict[str, float], cfg: RunConfig) -> int | None:
    q = metrics.get("sample-rate")
    return None if q is None else round(cfg.train.batch_size / q)


def _bisect(f, target: float, lo: int = 5, hi: int = 100_000) -> int:
    """The N in [lo, hi] where the decreasing ``f`` is nearest ``target``."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return min((lo, hi), key=lambda n: abs(f(n) - target))


def n_from_epsilon(metrics: dict[str, float], cfg: RunConfig) -> int | None:
    """ε with σ, δ and the step count: the accountant inverted over q = batch / N."""
    if not {"epsilon", "noise-multiplier", "delta", "dp-steps"} <= metrics.keys():
        return None
    sigma, delta, steps = (metrics[k] for k in ("noise-multiplier", "delta", "dp-steps"))
    return _bisect(lambda n: epsilon([(sigma, cfg.train.batch_size / n, int(steps))], delta,
                                     cfg.privacy.accountant), metrics["epsilon"])


def n_from_noise_multiplier(metrics: dict[str, float], cfg: RunConfig) -> int | None:
    """σ alone: the site planned it so that the run's steps spend exactly its budget at
    q = batch / N and its default δ, so the accountant inverted at the budget gives N."""
    sigma = metrics.get("noise-multiplier")
    if sigma is None:
        return None
    steps = cfg.federation.rounds * cfg.train.local_steps
    return _bisect(lambda n: epsilon([(sigma, cfg.train.batch_size / n, steps)],
                                     default_delta(n), cfg.privacy.accountant), BUDGET)


def n_from_attestation(reply) -> int | None:
    record = reply.content.config_records.get(p.ATTESTATION)
    if record is None:
        return None
    return Attestation.from_dict(dict(record)).fields().get("units")


READINGS = (n_from_sample_rate, n_from_epsilon, n_from_noise_multiplier)


@pytest.mark.parametrize("reading", READINGS, ids=lambda f: f.__name__)
def test_the_servers_readings_of_a_dp_reply_give_no_unit_count(replies, reading):
    """Before: each reading gave the site's exact N (40 users → N = 27 training units at
    clinic); after: the reply carries nothing it can read."""
    cfg, out = replies
    for site, (reply, ledger) in out.items():
        recovered = reading(_metrics(reply), cfg)
        assert recovered is None, (f"{reading.__name__} read N = {recovered} from {site}'s "
                                   f"reply (its true N is {_true_n(ledger, cfg)})")


def test_the_attestation_states_no_unit_count(replies):
    cfg, out = replies
    for site, (reply, ledger) in out.items():
        assert p.ATTESTATION in reply.content.config_records  # the site is attested
        recovered = n_from_attestation(reply)
        assert recovered is None, (f"{site}'s attestation states N = {recovered} (true N "
                                   f"{_true_n(ledger, cfg)})")


def test_two_sites_that_differ_only_in_n_send_the_same_clear_values(replies):
    """Everything but the (accounted) adapter, the salted commitment and the digest of the
    site's own policy (its ledger path is its own) is equal across sites of different N."""
    cfg, out = replies
    (reply_a, ledger_a), (reply_b, ledger_b) = out.values()
    assert _true_n(ledger_a, cfg) != _true_n(ledger_b, cfg)
    assert _metrics(reply_a) == _metrics(reply_b)
    assert dict(reply_a.content[p.SITE])["unit"] == dict(reply_b.content[p.SITE])["unit"]
    statements = []
    for reply, ledger in ((reply_a, ledger_a), (reply_b, ledger_b)):
        body = Attestation.from_dict(dict(reply.content[p.ATTESTATION])).fields()
        assert body.pop("policy_sha256") == policy_digest(ledger.policy)  # policy only
        for own in ("site", "units_root"):
            body.pop(own)
        statements.append(body)
    assert statements[0] == statements[1]


@pytest.mark.parametrize("reading", READINGS, ids=lambda f: f.__name__)
def test_each_reading_is_exact_on_what_the_old_reply_carried(replies, reading):
    """Control: fed the accounting the old reply carried (the site's own ledger values),
    every reading recovers the site's N, so the tests above fail only for lack of it."""
    cfg, out = replies
    for reply, ledger in out.values():
        [entry] = ledger.entries
        old = {**_metrics(reply), "epsilon": ledger.epsilon(), "delta": ledger.delta,
               "noise-multiplier": entry.noise_multiplier, "sample-rate": entry.sample_rate,
               "dp-steps": ledger.steps}
        assert reading(old, cfg) == _true_n(ledger, cfg)
