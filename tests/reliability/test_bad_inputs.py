"""Every bad input in the catalogue is answered with a clear error (fast tier; the CLI
cases start processes and are marked slow)."""

from __future__ import annotations

from collections import Counter

import pytest

from fedcpt.testing.bad_inputs import CATALOGUE, BadInput, try_input
from fedcpt.testing.bad_inputs.data import PROSE, _blocks
from fedcpt.testing.bad_inputs.ledgers import _ledger
from fedcpt.testing.bad_inputs.updates import _arrays, _update, _with


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.kind == "cli" else [])
    for c in CATALOGUE])
def test_bad_input_gets_a_clear_error(case, tmp_path):
    outcome = try_input(case, tmp_path)
    assert outcome.handled, outcome.answer


def test_catalogue_covers_every_kind_with_distinct_cases():
    kinds = Counter(c.kind for c in CATALOGUE)
    assert len(CATALOGUE) >= 30
    assert {"data", "config", "update", "ledger", "certificate", "cli"} <= set(kinds)
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("attempt", [
    lambda f: (f / "notes.txt").write_text(PROSE) and _blocks(f / "notes.txt"),
    lambda f: _ledger(f).record("run", 1, 1.0, 0.01, 10),
], ids=["data", "ledger"])
def test_the_judge_calls_a_valid_input_unhandled(attempt, tmp_path):
    # the same paths accept good input, so a "handled" verdict above means a rejection
    outcome = try_input(BadInput("valid", "control", attempt, r"."), tmp_path)
    assert not outcome.handled and outcome.answer.startswith("accepted")


def test_a_good_update_is_aggregated_not_rejected(tmp_path):
    outcome = try_input(BadInput("valid", "update", _update(_with(_arrays(1.0))), r"."),
                        tmp_path)
    assert not outcome.handled and outcome.answer.startswith("accepted")
