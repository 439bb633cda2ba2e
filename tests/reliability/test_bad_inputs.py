"""Every bad input in the catalogue is refused with a clear error, or answered and
accounted in the site's ledger where that is its stated outcome (fast tier; the CLI cases
start processes and are marked slow); every attack of issue 25 is in it."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

from fedcpt.privacy.ledger import SiteRefused
from fedcpt.testing.bad_inputs import ATTACK_TESTS, CATALOGUE, WHY, BadInput, Spent, try_input
from fedcpt.testing.bad_inputs.data import PROSE, _blocks
from fedcpt.testing.bad_inputs.judge import ACCOUNTED, REFUSED, ledger_entries
from fedcpt.testing.bad_inputs.ledgers import _ledger
from fedcpt.testing.bad_inputs.updates import _arrays, _update, _with

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.kind == "cli" else [])
    for c in CATALOGUE])
def test_bad_input_is_refused_or_accounted(case, tmp_path):
    outcome = try_input(case, tmp_path)
    assert outcome.handled, outcome.answer
    assert outcome.verdict == case.outcome


def test_catalogue_covers_every_kind_with_distinct_cases():
    kinds = Counter(c.kind for c in CATALOGUE)
    assert len(CATALOGUE) >= 30
    assert {"data", "config", "update", "ledger", "certificate", "proposal", "release",
            "secagg", "cli"} <= set(kinds)
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE)
    assert {c.outcome for c in CATALOGUE} == {REFUSED, ACCOUNTED}


def _defined(test: str) -> bool:
    path, name = test.split("::")
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body)


def test_every_attack_of_issue_25_is_in_the_catalogue_with_its_outcome():
    entries = {c.attack for c in CATALOGUE if c.attack}
    tested = {t.attack for t in ATTACK_TESTS}
    assert entries | tested == set(WHY)  # each item: a catalogue entry or its attack test
    assert tested == set(WHY)  # and each has the test that runs it whole
    assert set(WHY) - entries == {"4c"}  # stage 3 of five sites: by reference only
    assert all(t.outcome in (REFUSED, ACCOUNTED) for t in ATTACK_TESTS)
    missing = [t.test for t in ATTACK_TESTS if not _defined(t.test)]
    assert not missing, f"attack tests named but not defined: {missing}"


def test_the_reliability_docs_list_each_attack_with_its_entries_and_tests():
    docs = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    entries = [f"`{c.name}`" for c in CATALOGUE if c.attack]
    tests = [t.test.split("::")[1] for t in ATTACK_TESTS]
    assert not [n for n in entries + tests if n not in docs]
    assert all(f"| {attack} " in docs for attack in WHY)  # a row per attack


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


STATED = {"run": "run", "round": 1, "noise_multiplier": 1.0, "steps": 10}


def _answered(records: int, stated: tuple[dict, ...] = (STATED,), kept: dict | None = None):
    """An answer after which the site's ledger holds ``records`` new rounds."""
    def attempt(folder: Path) -> object:
        ledger = _ledger(folder)
        ledger.save()
        before = ledger_entries(ledger.path)
        for i in range(records):
            ledger.record("run", i + 1, 1.0, 0.01, 10)
        return Spent(ledger.path, before, stated, "answered", kept or {})
    return attempt


def _refused(folder: Path) -> object:
    raise SiteRefused("site 'clinic' refused the query")


@pytest.mark.parametrize(("attempt", "accounted"), [
    (_answered(1), True),
    (_answered(0), False),  # answered without spending
    (_answered(2), False),  # spent more than the answer states
    (_answered(1, ({**STATED, "steps": 1},)), False),  # the entry is not the stated release
    (_answered(1, kept={"delta": 1e-12}), False),  # the stored δ is not the site's
    (_refused, False),  # a refusal where an answer was due (an oracle)
], ids=["exact", "unpaid", "overspent", "other-release", "terms-moved", "refused"])
def test_the_judge_accounts_only_exactly_the_stated_release(attempt, accounted, tmp_path):
    outcome = try_input(BadInput("answer", "release", attempt, r".", ACCOUNTED), tmp_path)
    assert outcome.handled is accounted, outcome.answer
    assert (outcome.verdict == ACCOUNTED) is accounted
