"""`fedcpt privacy report` on a run folder, a ledgers folder, or one site's ledger."""

import json

from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.report import find_ledgers, write_privacy_report


def make_ledgers(folder):
    for site, steps in (("clinic", 40), ("newsroom", 80)):
        ledger = PrivacyLedger.open(folder / f"{site}.ledger.json", site, delta=1e-4,
                                    target_epsilon=8.0)
        for r in range(2):
            ledger.record("run", r + 1, 1.0, 0.01, steps)


def test_report_has_every_site_and_the_federation_maximum(tmp_path):
    make_ledgers(tmp_path / "ledgers")
    payload = write_privacy_report(find_ledgers(tmp_path), tmp_path)
    assert set(payload["sites"]) == {"clinic", "newsroom"}
    assert payload["max_epsilon"] == payload["sites"]["newsroom"]["epsilon"]
    assert payload["sites"]["clinic"]["budget_left"] == 8.0 - payload["sites"]["clinic"][
        "epsilon"]
    curve = payload["epsilon_per_round"]["newsroom"]
    assert len(curve) == 2 and curve[0] < curve[1]
    for name in ("privacy.json", "privacy_report.md", "privacy_epsilon.png"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "privacy.json").read_text())
    assert saved["level"] == "unit" and saved["units"] == ["document"]


def test_report_written_beside_ledgers_does_not_break_the_next_report(tmp_path):
    folder = tmp_path / "ledgers"
    make_ledgers(folder)
    write_privacy_report(find_ledgers(folder), folder)
    assert len(find_ledgers(folder)) == 2  # privacy.json is not mistaken for a ledger


def test_a_site_audits_its_own_ledger_alone(tmp_path):
    make_ledgers(tmp_path)
    ledgers = find_ledgers(tmp_path / "clinic.ledger.json")
    assert [ledger.site for ledger in ledgers] == ["clinic"]


def test_report_names_the_unit_every_release_and_who_set_each_value(tmp_path):
    from fedcpt.config import SiteConfig
    from fedcpt.privacy.policy import site_policy

    node = {"site-name": "clinic", "data-path": "/d", "privacy-unit": "field:patient_id",
            "eval-release": "noised"}
    policy = site_policy(None, SiteConfig(name="clinic", data=("/d",)), node, deployed=True)
    ledger = PrivacyLedger.open(tmp_path / "clinic.ledger.json", "clinic", delta=1e-6,
                                target_epsilon=8.0, unit=policy.unit)
    ledger.policy = policy.record()
    ledger.record("run", 1, 1.0, 0.05, 40)
    ledger.record("run/eval", 1, 4.0, 1.0, 3, kind="eval")
    payload = write_privacy_report([ledger], tmp_path)
    row = payload["sites"]["clinic"]
    assert row["unit"] == "field:patient_id" and row["steps"] == 40
    assert row["eval_releases"] == 3
    assert row["noise_multiplier"] == 1.0  # the last DP-SGD round, not the evaluation
    # the release list is the gate's table: each key, each reply, its class
    assert any(r.startswith("held-out domain loss (`metrics.domain-loss`), evaluate") and
               ": accounted — discrete Gaussian mechanism (OpenDP" in r and
               "in the ledger before release" in r for r in row["releases"])
    assert any(r.startswith("train-seconds (`metrics.train-seconds`), train (DP-SGD)") and
               ": public — sent as 0 under DP" in r for r in row["releases"])
    assert not any("`metrics.train-loss`" in r for r in row["releases"])  # not sent
    text = (tmp_path / "privacy_report.md").read_text()
    assert "| unit | field:patient_id | site node config |" in text
    assert "| delta | 0.0 | site default |" in text


def test_a_secagg_release_is_reported_as_a_sum_with_the_other_sites_outside_epsilon(tmp_path):
    from fedcpt.config import SiteConfig
    from fedcpt.privacy.policy import site_policy

    node = {"site-name": "clinic", "data-path": "/d", "eval-release": "secagg"}
    policy = site_policy(None, SiteConfig(name="clinic", data=("/d",)), node, deployed=True)
    ledger = PrivacyLedger.open(tmp_path / "clinic.ledger.json", "clinic", delta=1e-6,
                                target_epsilon=8.0, unit=policy.unit)
    ledger.policy = policy.record()
    ledger.record("run", 1, 1.0, 0.05, 40)
    releases = write_privacy_report([ledger], tmp_path)["sites"]["clinic"]["releases"]
    [line] = [r for r in releases if "masked-evaluate" in r]
    assert "released only as a sum with the other sites', once per adapter version" in line
    assert ": released without DP —" in line and "NOT covered by ε" in line
    assert not any("`metrics.domain-loss`" in r for r in releases)  # never per site
    assert "| eval_release | secagg | site node config |" in (
        tmp_path / "privacy_report.md").read_text()
