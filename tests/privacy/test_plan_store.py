"""Noise plans shared across processes through the store, and the store attacked: a forged σ
never lowers the noise, a wasteful one is not used, a broken file costs a re-plan."""

from __future__ import annotations

import json
import logging

import pytest

from fedcpt.privacy import accounting, plan_store
from fedcpt.privacy.accounting import epsilon, plan_noise

# RDP: the store does not depend on the accountant, and RDP's ε is 3x cheaper than PRV's
PLAN = {"target_epsilon": 8.0, "delta": 1e-5, "sample_rate": 0.01078, "steps": 8,
        "accountant": "rdp"}
INPUTS = [8.0, 1e-5, 0.01078, 8, "rdp", [], 0.01]  # as plan_noise keys PLAN (no prior)


def spent(sigma: float) -> float:
    return epsilon([(sigma, PLAN["sample_rate"], PLAN["steps"])], PLAN["delta"], "rdp")


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store, and a planner with no per-process memory (a fresh process)."""
    monkeypatch.setenv("FEDCPT_CACHE", str(tmp_path))
    accounting._plan_noise.cache_clear()
    yield tmp_path / "noise-plans"
    accounting._plan_noise.cache_clear()


@pytest.fixture
def calls(monkeypatch):
    """How many times the planner asks the accountant for ε."""
    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return epsilon(*args, **kwargs)

    monkeypatch.setattr(accounting, "epsilon", counted)
    return count


def fresh_process_plan() -> float:
    accounting._plan_noise.cache_clear()
    return plan_noise(**PLAN)


def test_a_second_process_reuses_the_plan_with_at_most_two_accountant_calls(store, calls):
    first = fresh_process_plan()
    bisection_calls = calls[0]
    assert len(list(store.glob("*.json"))) == 1
    calls[0] = 0
    assert fresh_process_plan() == first
    assert calls[0] <= 2 < bisection_calls


def test_a_forged_smaller_sigma_is_refused_and_the_budget_still_holds(store, calls, caplog):
    honest = fresh_process_plan()
    # the attacker (anyone who can write the cache folder) halves the site's noise
    plan_store.save(INPUTS, honest / 2)
    assert spent(honest / 2) > 8.0
    with caplog.at_level(logging.WARNING, logger="fedcpt.privacy.accounting"):
        sigma = fresh_process_plan()
    assert sigma == honest
    assert spent(sigma) <= 8.0
    assert "does not meet the plan" in caplog.text
    assert plan_store.load(INPUTS) == honest  # the re-plan replaced the forged entry


def test_a_forged_wasteful_sigma_is_not_used(store):
    honest = fresh_process_plan()
    plan_store.save(INPUTS, honest * 3)  # within budget, but far more noise than needed
    assert fresh_process_plan() == honest


@pytest.mark.parametrize("content", ['{"inputs": [], "sigma": 0.1}', "not json"])
def test_a_broken_or_foreign_entry_costs_a_re_plan(store, caplog, content):
    honest = fresh_process_plan()
    (entry,) = store.glob("*.json")
    entry.write_text(content)
    with caplog.at_level(logging.WARNING, logger="fedcpt.privacy.plan_store"):
        assert fresh_process_plan() == honest
    assert "ignoring" in caplog.text


@pytest.mark.parametrize("sigma", ['"0.5"', "NaN", "-1.0", "0", "1"])
def test_only_a_positive_finite_float_is_read_back(store, caplog, sigma):
    store.mkdir(parents=True)
    plan_store.save(INPUTS, 0.5)
    (entry,) = store.glob("*.json")
    entry.write_text(f'{{"inputs": {json.dumps(INPUTS)}, "sigma": {sigma}}}')
    with caplog.at_level(logging.WARNING, logger="fedcpt.privacy.plan_store"):
        assert plan_store.load(INPUTS) is None
    assert "ignoring" in caplog.text


def test_an_unwritable_store_is_logged_and_planning_goes_on(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FEDCPT_CACHE", str(blocker))  # noise-plans/ cannot be made under it
    accounting._plan_noise.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fedcpt.privacy.plan_store"):
        sigma = plan_noise(**PLAN)
    accounting._plan_noise.cache_clear()
    assert spent(sigma) <= 8.0
    assert "could not keep the noise plan" in caplog.text


def test_plans_for_other_inputs_do_not_share_an_entry(store):
    plan_store.save(INPUTS, 0.5)
    for changed in ([4.0] + INPUTS[1:], INPUTS[:5] + [[[1.0, 0.01, 10]]] + INPUTS[6:],
                    INPUTS[:4] + ["prv"] + INPUTS[5:]):
        assert plan_store.load(changed) is None
    assert plan_store.load(list(INPUTS)) == 0.5
