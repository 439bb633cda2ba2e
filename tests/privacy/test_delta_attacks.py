"""A hostile server against the site's δ, through the real train handler: a stricter δ it
proposes once holds for that run only, and a δ no accountant can compute is refused
before anything is spent (the ledger byte for byte unchanged)."""

from __future__ import annotations

import logging
import re

import pytest

import fedcpt.client.app as client_app
from fedcpt.config import load_config
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy.accounting import MIN_DELTA, UncomputableEpsilon, epsilon
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.testing.bad_inputs.proposals import _site_data
from fedcpt.testing.site_round import site_context, task_identity, train_message

SITE_DELTA = 1e-7  # the site's own, in its node config


def _train(tmp_path, run: str, overrides: list[str]):
    cfg = load_config("smoke-dp", overrides=["privacy.noise_multiplier=1.0", *overrides])
    ledger = tmp_path / "clinic.ledger.json"
    data = tmp_path / "notes.jsonl"
    if not data.exists():
        _site_data(tmp_path)
    context = site_context(str(data), ledger, name="clinic", unit="field:user_id",
                           **{"heldout-fraction": "0.3", "delta": str(SITE_DELTA)})
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    with task_identity():
        return client_app.train(train_message(cfg, run, 1, initial), context), ledger


_ACCOUNTED = re.compile(r"ledger ε=([\d.]+) .* at δ=([\d.e-]+) after")


def _site_accounting(caplog) -> tuple[float, float]:
    """(ε, δ) the site's own log states after the round (no reply carries them: N)."""
    [(eps, delta)] = [m.groups() for m in map(_ACCOUNTED.search, caplog.messages) if m]
    caplog.clear()
    return float(eps), float(delta)


def test_a_delta_the_server_proposes_once_holds_for_that_run_only(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedcpt.client.train_step")
    tight, ledger_path = _train(tmp_path, "run-tight", ["privacy.target_delta=1e-12"])
    assert not tight.has_error(), tight.error.reason if tight.has_error() else ""
    assert _site_accounting(caplog)[1] == 1e-12  # the run is held to it
    assert PrivacyLedger.load(ledger_path).delta == SITE_DELTA  # the ledger keeps the site's
    later, _ = _train(tmp_path, "run-later", [])
    assert not later.has_error(), later.error.reason if later.has_error() else ""
    ledger = PrivacyLedger.load(ledger_path)
    eps, delta = _site_accounting(caplog)
    assert delta == SITE_DELTA  # before: still 1e-12
    assert ledger.delta == SITE_DELTA and len(ledger.entries) == 2
    assert eps == pytest.approx(epsilon(ledger.history, SITE_DELTA), abs=1e-3)


def test_an_uncomputable_delta_is_refused_before_any_spend(tmp_path, site_refusal):
    delta = "1e-30"  # Opacus's PRV raised an unhandled ValueError on it
    first, ledger_path = _train(tmp_path, "run-1", [])  # the site has a history
    assert not first.has_error()
    before = ledger_path.read_bytes()
    reply, _ = _train(tmp_path, "run-2", [f"privacy.target_delta={delta}"])
    site_refusal(reply, re.escape(
        f"refuses `privacy.target_delta` = {float(delta):g}: below {MIN_DELTA:g}"))
    assert ledger_path.read_bytes() == before


def test_an_accountant_that_cannot_compute_says_so():
    with pytest.raises(UncomputableEpsilon, match=r"prv accountant cannot compute ε at δ=1e-15"):
        epsilon([(1.0, 0.01, 100)], 1e-15)
