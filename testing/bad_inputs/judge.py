"""How a bad input is judged: one case, its outcome, and the verdict.

Each case states the outcome it must get: *refused* (most cases) or *accounted*.

An input is *refused* only if it raised one of fedcpt's own errors
(:class:`~fedcpt.exceptions.FedcptError` and its subclasses: ConfigError, DataError,
UpdateRejected, LedgerError, SiteRefused, …) whose message names the problem (the case's
``expect`` pattern), or, at the command line, exited 2 with a single ``error:`` line. An
update counts as refused when the strategy rejected it — kept it out of the average and
recorded why — through the round loop's own collection
(:func:`fedcpt.server.round_loop.collect_train`) and :mod:`fedcpt.strategies.fedavg`.

An attack is *accounted* when the site answered and paid for the answer: the attempt returns
:class:`Spent`, and the site's ledger holds exactly what it held before plus one new entry
per release the attack states (from public parameters), each with the stated values — never
an answer without its entry, never more spent than stated — and keeps the stated terms (its
δ, its budget). The answer (what the server got, then the ledger's growth) must match
``expect``.

Anything else (accepted, another exception, an unclear message, the other outcome than the
stated one) is unhandled: a refusal where an answer was due is an oracle too.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedcpt.exceptions import FedcptError
from fedcpt.privacy.ledger import PrivacyLedger

REFUSED, ACCOUNTED = "refused", "accounted"


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``attempt(folder)`` feeds it to fedcpt in a fresh folder."""

    name: str
    kind: str  # data, config, update, ledger, certificate, proposal, release, secagg, cli
    attempt: Callable[[Path], object]
    expect: str  # regex the answer must match: it names the problem
    outcome: str = REFUSED  # what fedcpt must do with it: refused or accounted
    attack: str = ""  # the item of issue 25's "Why" list it replays ("4a"), if any


@dataclass(frozen=True)
class Spent:
    """What an attempt returns when the site answered: its ledger, the entries it held
    before, the releases the answers account for (the values each new entry must have), the
    ledger's stored terms that must hold after (e.g. the site's δ), and what the server got."""

    ledger: Path
    before: tuple[dict, ...]
    stated: tuple[dict, ...]
    answer: str
    kept: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str
    handled: bool
    answer: str
    verdict: str = "unhandled"  # refused, accounted, accepted or unhandled


def ledger_entries(path: Path) -> tuple[dict, ...]:
    """The entries of the ledger at ``path`` as stored (none if there is no ledger yet)."""
    return tuple(json.loads(path.read_text())["entries"]) if path.exists() else ()


def _growth(spent: Spent) -> tuple[bool, str]:
    """Whether the ledger grew by exactly the stated releases, and how it grew."""
    try:
        PrivacyLedger.load(spent.ledger)  # a valid ledger, its checksum intact
    except FedcptError as err:
        return False, f"no valid ledger after the answer: {err}"
    stored = json.loads(spent.ledger.read_text())
    after, n = tuple(stored["entries"]), len(spent.before)
    new = after[n:]
    grew = "; ".join(f"{e['kind']} {e['run']} round {e['round']}: σ={e['noise_multiplier']:g}, "
                     f"q={e['sample_rate']:g}, {e['steps']} steps" for e in new)
    answer = f"ledger +{len(new)}: {grew or 'nothing'}"
    moved = {k: stored.get(k) for k, v in spent.kept.items() if stored.get(k) != v}
    exact = (after[:n] == spent.before and len(new) == len(spent.stated)
             and all(e.items() >= s.items() for e, s in zip(new, spent.stated, strict=True)))
    if moved:
        answer += f"; terms moved: {moved}"
    elif not exact:
        answer += f"; stated {list(spent.stated)}"
    return exact and not moved, answer


def try_input(case: BadInput, folder: Path) -> Outcome:
    """Feed ``case`` to fedcpt and judge the answer (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = case.attempt(folder)
    except FedcptError as err:
        answer = f"{type(err).__name__}: {err}"
        clear = case.outcome == REFUSED and bool(re.search(case.expect, str(err)))
        return Outcome(case.name, case.kind, clear, answer, REFUSED)
    except Exception as err:  # noqa: BLE001 - any other exception is the finding
        return Outcome(case.name, case.kind, False, f"unhandled {type(err).__name__}: {err}")
    if isinstance(result, subprocess.CompletedProcess):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        refused = result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:")
        clear = case.outcome == REFUSED and refused and bool(re.search(case.expect, lines[0]))
        return Outcome(case.name, case.kind, clear,
                       f"exit {result.returncode}: {result.stderr.strip()[-500:]}",
                       REFUSED if refused else "unhandled")
    if isinstance(result, Spent):
        exact, grew = _growth(result)
        answer = f"{result.answer}; {grew}"
        clear = case.outcome == ACCOUNTED and exact and bool(re.search(case.expect, answer))
        return Outcome(case.name, case.kind, clear, answer[:500],
                       ACCOUNTED if exact else "accepted")
    return Outcome(case.name, case.kind, False, f"accepted ({result!r})"[:500], "accepted")
