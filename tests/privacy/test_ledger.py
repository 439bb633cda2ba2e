"""The site ledger accumulates across reopenings and refuses corrupt or foreign files."""

import json

import pytest

from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.ledger import LedgerError, PrivacyBudgetExhausted, PrivacyLedger


def new_ledger(path, site="clinic", target=8.0):
    return PrivacyLedger.open(path, site, delta=1e-4, target_epsilon=target)


def test_spend_accumulates_across_restarts(tmp_path):
    path = tmp_path / "clinic.json"
    ledger = new_ledger(path)
    ledger.record("run-a", 1, 1.0, 0.01, 50)
    # a new process opens the same ledger: the history is still there
    reopened = new_ledger(path)
    reopened.record("run-b", 1, 0.8, 0.02, 30)
    final = new_ledger(path)
    assert final.steps == 80
    assert final.history == [(1.0, 0.01, 50), (0.8, 0.02, 30)]
    assert final.epsilon() == pytest.approx(
        epsilon([(1.0, 0.01, 50), (0.8, 0.02, 30)], 1e-4))
    assert final.epsilon() > epsilon([(1.0, 0.01, 50)], 1e-4)


def test_round_that_would_exceed_budget_is_refused_and_not_recorded(tmp_path):
    ledger = new_ledger(tmp_path / "clinic.json", target=1.0)
    ledger.record("run", 1, 1.0, 0.05, 100)
    before = (tmp_path / "clinic.json").read_text()
    with pytest.raises(PrivacyBudgetExhausted, match="refuses to train"):
        ledger.check_budget(0.5, 0.05, 100)
    assert (tmp_path / "clinic.json").read_text() == before


def test_tampered_ledger_is_rejected_and_left_untouched(tmp_path):
    path = tmp_path / "clinic.json"
    ledger = new_ledger(path)
    ledger.record("run", 1, 1.0, 0.01, 50)
    payload = json.loads(path.read_text())
    payload["entries"][0]["steps"] = 5  # someone tries to hide spend
    path.write_text(json.dumps(payload))
    tampered = path.read_text()
    with pytest.raises(LedgerError, match="checksum mismatch"):
        new_ledger(path)
    assert path.read_text() == tampered


def test_corrupt_ledger_is_rejected(tmp_path):
    path = tmp_path / "clinic.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="not a valid privacy ledger"):
        new_ledger(path)


def test_ledger_of_another_site_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    new_ledger(path, site="clinic").record("run", 1, 1.0, 0.01, 10)
    with pytest.raises(LedgerError, match="ledger of site 'clinic', not 'newsroom'"):
        new_ledger(path, site="newsroom")


def test_write_is_atomic_no_temp_file_left(tmp_path):
    new_ledger(tmp_path / "clinic.json").record("run", 1, 1.0, 0.01, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clinic.json"]


def test_concurrent_writers_lose_no_spend(tmp_path):
    # two federations share one site ledger: each records under the lock, re-reading first
    path = tmp_path / "clinic.ledger.json"
    first, second = new_ledger(path), new_ledger(path)
    with first.locked() as ledger:
        ledger.record("run-a", 1, 1.0, 0.01, 50)
    with second.locked() as ledger:
        ledger.record("run-b", 1, 1.0, 0.01, 30)
    assert new_ledger(path).steps == 80


def test_a_run_can_lower_but_not_raise_the_stored_budget(tmp_path):
    path = tmp_path / "clinic.ledger.json"
    new_ledger(path, target=4.0).record("run", 1, 1.0, 0.01, 10)
    assert new_ledger(path, target=8.0).target_epsilon == 4.0
    assert new_ledger(path, target=2.0).target_epsilon == 2.0
    raised = PrivacyLedger.open(path, "clinic", delta=1e-4, target_epsilon=8.0,
                                site_sets_budget=True)  # the site's own node config
    assert raised.target_epsilon == 8.0


def test_json_that_is_not_a_ledger_is_rejected(tmp_path):
    path = tmp_path / "clinic.ledger.json"
    path.write_text("[]")
    with pytest.raises(LedgerError, match="not a valid privacy ledger"):
        new_ledger(path)


def test_histories_of_different_units_are_never_composed(tmp_path):
    path = tmp_path / "clinic.ledger.json"
    ledger = PrivacyLedger.open(path, "clinic", delta=1e-5, target_epsilon=8.0,
                                unit="field:patient_id")
    ledger.record("run", 1, 1.0, 0.01, 10)
    with pytest.raises(LedgerError, match="privacy unit 'field:patient_id', but the site's "
                                          "unit is now 'document'"):
        PrivacyLedger.open(path, "clinic", delta=1e-5, target_epsilon=8.0, unit="document")
    assert PrivacyLedger.load(path).unit == "field:patient_id"


def test_delta_can_only_tighten(tmp_path):
    path = tmp_path / "clinic.ledger.json"
    PrivacyLedger.open(path, "clinic", delta=1e-5, target_epsilon=8.0).record("r", 1, 1.0,
                                                                               0.01, 10)
    assert PrivacyLedger.open(path, "clinic", delta=0.2, target_epsilon=8.0).delta == 1e-5
    assert PrivacyLedger.open(path, "clinic", delta=1e-7, target_epsilon=8.0).delta == 1e-7
