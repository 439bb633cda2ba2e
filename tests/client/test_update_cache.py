"""A DP site pays for a (run, round) once: asked again it resends the stored update."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

import fedcpt.client.app as client_app
import fedcpt.client.train_step as train_step
from fedcpt.client.update_cache import (
    StoredUpdate,
    UpdateCache,
    reusable_update,
)
from fedcpt.config import load_config
from fedcpt.core.adapters import arrays_digest
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy.ledger import LedgerError, PrivacyLedger, SiteRefused
from fedcpt.testing.site_round import site_context, task_identity, train_message

RUN = "run-a"


def arrays(seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({"a.lora_A.weight": Array(rng.normal(size=(4, 8)).astype(np.float32)),
                        "a.lora_B.weight": Array(rng.normal(size=(8, 4)).astype(np.float32))})


def same(x: ArrayRecord, y: ArrayRecord) -> bool:
    return list(x.keys()) == list(y.keys()) and all(
        np.array_equal(x[k].numpy(), y[k].numpy()) for k in x.keys())


def stored(server_round: int = 1, request: str = "global-1", seed: int = 0) -> StoredUpdate:
    return StoredUpdate(run=RUN, round=server_round, request=request, arrays=arrays(seed),
                        metrics={"num-examples": 16, "train-seconds": 0.5},
                        noise_multiplier=1.1, sample_rate=0.05, steps=4)


@pytest.fixture
def ledger(tmp_path) -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path / "clinic.ledger.json", "clinic", delta=1e-3,
                              target_epsilon=50.0)


@pytest.fixture
def cache(ledger) -> UpdateCache:
    return UpdateCache.beside(ledger.path)


# --- the real train handler -------------------------------------------------------------
def test_same_round_twice_is_paid_once_and_resends_the_same_update(tmp_path, write_text,
                                                                    monkeypatch):
    cfg = load_config("smoke-dp", overrides=["federation.rounds=3"])
    context = site_context(str(write_text("clinic.txt")), tmp_path / "clinic.ledger.json",
                           name="clinic")
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    trained = []
    real = train_step.train_adapter_dp
    monkeypatch.setattr(train_step, "train_adapter_dp",
                        lambda *a, **k: trained.append(1) or real(*a, **k))
    with task_identity():
        first = client_app.train(train_message(cfg, RUN, 1, initial), context)
        again = client_app.train(train_message(cfg, RUN, 1, initial), context)
    assert not first.has_error() and not again.has_error()
    assert len(trained) == 1  # the second request trained nothing
    assert same(first.content["arrays"], again.content["arrays"])
    assert dict(first.content["metrics"]) == dict(again.content["metrics"])
    ledger = PrivacyLedger.load(tmp_path / "clinic.ledger.json")
    assert [(e.run, e.round) for e in ledger.entries] == [(RUN, 1)]
    assert ledger.steps == cfg.train.local_steps


# --- every state a crash can leave behind ----------------------------------------------
def test_paid_and_stored_is_resent_without_spending(ledger, cache):
    cache.store(stored())
    ledger.record(RUN, 1, 1.1, 0.05, 4)
    update = reusable_update(ledger, cache, RUN, 1, "global-1")
    assert update is not None and same(update.arrays, arrays(0))
    assert len(PrivacyLedger.load(ledger.path).entries) == 1


def test_stored_but_unrecorded_update_is_recorded_once_then_sent(ledger, cache):
    cache.store(stored())  # the site died between storing the update and the ledger write
    update = reusable_update(ledger, cache, RUN, 1, "global-1")
    assert update is not None and same(update.arrays, arrays(0))
    entries = PrivacyLedger.load(ledger.path).entries
    assert [(e.run, e.round, e.noise_multiplier, e.sample_rate, e.steps) for e in entries] \
        == [(RUN, 1, 1.1, 0.05, 4)]
    assert reusable_update(ledger, cache, RUN, 1, "global-1") is not None  # now paid
    assert len(PrivacyLedger.load(ledger.path).entries) == 1


def test_unrecorded_update_over_the_budget_is_refused_and_spends_nothing(tmp_path, cache):
    tight = PrivacyLedger.open(tmp_path / "clinic.ledger.json", "clinic", delta=1e-3,
                               target_epsilon=0.01)
    cache.store(stored())
    with pytest.raises(SiteRefused, match="refuses to train"):
        reusable_update(tight, cache, RUN, 1, "global-1")
    assert not tight.path.exists()


def test_paid_round_without_stored_update_is_refused_not_trained_twice(ledger, cache):
    ledger.record(RUN, 1, 1.1, 0.05, 4)  # e.g. recorded by an older fedcpt, or deleted
    with pytest.raises(SiteRefused, match="already paid for round 1 .* no stored update"):
        reusable_update(ledger, cache, RUN, 1, "global-1")
    assert len(PrivacyLedger.load(ledger.path).entries) == 1


def test_paid_round_with_corrupt_update_is_refused(ledger, cache):
    cache.store(stored())
    ledger.record(RUN, 1, 1.1, 0.05, 4)
    path = cache.path(RUN, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a tensor byte
    path.write_bytes(bytes(data))
    with pytest.raises(SiteRefused, match="cannot resend it .*checksum mismatch"):
        reusable_update(ledger, cache, RUN, 1, "global-1")


def test_unpaid_corrupt_update_is_discarded_and_trained_afresh(ledger, cache):
    cache.store(stored())
    cache.path(RUN, 1).write_bytes(b"\0" * 10)
    assert reusable_update(ledger, cache, RUN, 1, "global-1") is None
    assert not cache.path(RUN, 1).exists() and not ledger.path.exists()


def test_update_trained_from_another_global_adapter(ledger, cache):
    cache.store(stored(request="global-1"))
    # unpaid: it never left the site, so it is discarded and the round trained afresh
    assert reusable_update(ledger, cache, RUN, 1, "global-2") is None
    assert not cache.path(RUN, 1).exists()
    cache.store(stored(request="global-1"))
    ledger.record(RUN, 1, 1.1, 0.05, 4)
    with pytest.raises(SiteRefused, match="trained from another global adapter"):
        reusable_update(ledger, cache, RUN, 1, "global-2")


def test_ledger_refuses_to_record_a_round_twice(ledger):
    ledger.record(RUN, 1, 1.1, 0.05, 4)
    with pytest.raises(LedgerError, match="already recorded round 1 of run 'run-a'"):
        ledger.record(RUN, 1, 1.1, 0.05, 4)
    ledger.record("run-b", 1, 1.1, 0.05, 4)  # another run's round 1 is another round
    assert len(PrivacyLedger.load(ledger.path).entries) == 2


def test_only_the_latest_round_of_each_run_is_kept(cache):
    cache.store(stored(1))
    other = StoredUpdate(**{**stored(1).__dict__, "run": "run-b"})
    cache.store(other)
    (cache.folder / (cache.path(RUN, 2).name + ".tmp")).write_bytes(b"half")  # killed write
    cache.store(stored(2, seed=1))
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted(
        [cache.path(RUN, 2).name, cache.path("run-b", 1).name])
    loaded = cache.load(RUN, 2)
    assert loaded is not None and same(loaded.arrays, arrays(1))
    assert loaded.metrics == {"num-examples": 16, "train-seconds": 0.5}


def test_digest_names_tensor_content():
    assert arrays_digest(arrays(0)) == arrays_digest(arrays(0))
    assert arrays_digest(arrays(0)) != arrays_digest(arrays(1))
