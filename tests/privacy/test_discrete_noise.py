"""The noised evaluation, attacked as attack 2 of issue 25 ran it: two neighbouring
datasets, many releases from the site's real evaluate handler, and a test of each release
against both candidate sums. Before: float32 noise on a float64 sum left a float32-exact
remainder only for the true sum, which told the datasets apart in every trial. Now the
release is an integer grid sum plus exact discrete Gaussian noise, and the remainder
tests separate nothing; the ledger's accounting of it never under-reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld

import fedcpt.client.app as client_app
import fedcpt.privacy.release as release
from fedcpt.config import load_config
from fedcpt.core import protocol as p
from fedcpt.core.model import load_adapted_model
from fedcpt.privacy.accounting import epsilon
from fedcpt.privacy.discrete_noise import (
    GRID_STEPS,
    accounted_noise_multiplier,
    grid_point,
    noised_mean,
)
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.testing.site_round import site_context, task_identity, train_message

TRIALS = 12
USERS = 40
SIGMA = 4.0  # the site default eval_noise_multiplier: one release allows at most Φ(1/8) ≈ 55 %


def _notes(path, changed: bool) -> str:
    """40 users' notes; the neighbour differs in one user's text (every user is one unit)."""
    lines = [json.dumps({"user_id": f"p{u}", "text": " ".join(
        f"Note {i} of patient {u}: slept well, walked a little, asked about lunch."
        for i in range(11))}) for u in range(USERS)]
    if changed:
        lines = [line.replace("slept well", "had a fever at night") for line in lines]
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def _remainder_consistent(released: float, total: float, k: int) -> bool:
    """The float attack: is ``released`` ``fl(fl(total + n) / k)`` for some float32 noise
    n? Only the true total leaves such an n (within a few float32 steps of
    released·k − total)."""
    guess = np.float32(released * k - total)
    for _ in range(4):
        guess = np.nextafter(guess, np.float32(-np.inf))
    for _ in range(9):
        if (total + float(guess)) / k == released:
            return True
        guess = np.nextafter(guess, np.float32(np.inf))
    return False


def _grid_consistent(released: float, grid_total: int, k: int, bound: float) -> bool:
    """The grid attack: does released·k/step − the hypothesis's grid sum land off the
    integers for one hypothesis and on them for the other?"""
    steps = released * k * GRID_STEPS / bound - grid_total
    return abs(steps - round(steps)) < 1e-6


def test_the_float_remainder_no_longer_tells_neighbouring_datasets_apart(tmp_path,
                                                                        monkeypatch):
    cfg = load_config("smoke-dp", overrides=["privacy.accountant=rdp"])
    initial = load_adapted_model(cfg.model, cfg.lora, cfg.seed).initial_adapter
    policy = {"heldout-fraction": "0.5", "eval-release": "noised",
              "eval-noise-multiplier": str(SIGMA), "epsilon-budget": "1000"}
    sites = []
    for b in (0, 1):  # one folder (ledger, salted split) per dataset
        folder = tmp_path / f"d{b}"
        folder.mkdir()
        sites.append((folder / "clinic.ledger.json", site_context(
            _notes(folder / "notes.jsonl", changed=b == 1), folder / "clinic.ledger.json",
            name="clinic", unit="field:user_id", **policy)))
    seen: list[list[float]] = []
    real = release._per_unit
    monkeypatch.setattr(release, "_per_unit",
                        lambda lm, chosen: seen.append(real(lm, chosen)[0]) or real(lm, chosen))

    def evaluate(b: int, run: str) -> float:
        with task_identity():
            reply = client_app.evaluate(train_message(cfg, run, 1, initial), sites[b][1])
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return float(reply.content[p.METRICS][p.DOMAIN_LOSS])

    # The attacker knows both datasets, hence each one's per-unit losses.
    losses = []
    for b in (0, 1):
        seen.clear()
        evaluate(b, f"learn-{b}")
        losses.append(seen[-1])
    k, bound = len(losses[0]), 10.0
    assert losses[0] != losses[1]
    totals = [sum(min(max(v, 0.0), bound) for v in unit) for unit in losses]
    grids = [sum(grid_point(v, bound) for v in unit) for unit in losses]
    correct = 0
    for trial in range(TRIALS):
        secret = trial % 2  # alternating: an attacker who learns nothing scores exactly half
        released = evaluate(secret, f"trial-{trial}")
        fits = [_remainder_consistent(released, totals[h], k) or
                _grid_consistent(released, grids[h], k, bound) for h in (0, 1)]
        guess = 1 if fits == [False, True] else 0  # only a one-sided fit is evidence
        correct += guess == secret
    # Today's code: all of them. ε at σ = 4 allows Φ(1/(2σ)) ≈ 55 % per release.
    assert correct <= math.ceil(0.57 * TRIALS), f"{correct} of {TRIALS} told apart"
    for ledger_path, _ in sites:  # every release was spent before it left
        ledger = PrivacyLedger.load(ledger_path)
        assert all(e.noise_multiplier <= SIGMA for e in ledger.entries)
        assert sum(e.steps for e in ledger.entries) >= 2 * (TRIALS // 2)


def test_the_release_is_a_grid_point_noised_by_integers():
    values = [0.1, 2.5, 9.99, 12.0, float("nan"), -1.0]
    assert [grid_point(v, 10.0) for v in values] == [655, 16384, 65470, GRID_STEPS,
                                                     GRID_STEPS, 0]
    draws = [noised_mean(values, 10.0, 0.5) * len(values) * GRID_STEPS / 10.0
             for _ in range(400)]
    assert all(abs(d - round(d)) < 1e-6 for d in draws)  # every release is on the grid
    total = sum(grid_point(v, 10.0) for v in values)
    spread = np.std([d - total for d in draws]) / GRID_STEPS
    assert 0.4 < spread < 0.6  # std σ in units of the bound


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_the_ledger_never_under_reports_the_discrete_gaussian(sigma):
    """The ledger records OpenDP's zCDP-derived multiplier and analyses it as a Gaussian;
    for 1 and 10 releases, its PRV and RDP ε stay at or above dp-accounting's
    (pessimistic) PLD of the discrete Gaussian itself on this grid. (The PLD enumerates
    the noise's support: larger σ take minutes; their gap to the continuous Gaussian only
    shrinks as σ·GRID_STEPS grows.)"""
    accounted = accounted_noise_multiplier(sigma)
    assert accounted <= sigma and accounted == pytest.approx(sigma, rel=1e-9)
    one = pld.from_discrete_gaussian_mechanism(sigma * GRID_STEPS, sensitivity=GRID_STEPS,
                                               value_discretization_interval=1e-3)
    for releases in (1, 10):
        exact = one.self_compose(releases) if releases > 1 else one
        for delta in (1e-5, 1e-8):
            truth = exact.get_epsilon_for_delta(delta)
            for accountant in ("prv", "rdp"):
                assert epsilon([(accounted, 1.0, releases)], delta, accountant) >= truth
