"""How a bad input is judged: one case, its outcome, and the verdict.

An input is *handled* only if it raised one of fedcpt's own errors
(:class:`~fedcpt.exceptions.FedcptError` and its subclasses: ConfigError, DataError,
UpdateRejected, LedgerError, SiteRefused, …) whose message names the problem (the case's
``expect`` pattern), or, at the command line, exited 2 with a single ``error:`` line. An
update counts as handled when the strategy rejected it — kept it out of the average and
recorded why — through the round loop's own collection
(:func:`fedcpt.server.round_loop.collect_train`) and :mod:`fedcpt.strategies.fedavg`.
Anything else (accepted, another exception, an unclear message) is unhandled.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedcpt.exceptions import FedcptError


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``attempt(folder)`` feeds it to fedcpt in a fresh folder."""

    name: str
    kind: str  # data, config, update, ledger, certificate, proposal, cli
    attempt: Callable[[Path], object]
    expect: str  # regex the answer must match: it names the problem


@dataclass(frozen=True)
class Outcome:
    name: str
    kind: str
    handled: bool
    answer: str


def try_input(case: BadInput, folder: Path) -> Outcome:
    """Feed ``case`` to fedcpt and judge the answer (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = case.attempt(folder)
    except FedcptError as err:
        answer = f"{type(err).__name__}: {err}"
        return Outcome(case.name, case.kind, bool(re.search(case.expect, str(err))), answer)
    except Exception as err:  # noqa: BLE001 - any other exception is the finding
        return Outcome(case.name, case.kind, False, f"unhandled {type(err).__name__}: {err}")
    if isinstance(result, subprocess.CompletedProcess):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        clear = (result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:")
                 and bool(re.search(case.expect, lines[0])))
        return Outcome(case.name, case.kind, clear,
                       f"exit {result.returncode}: {result.stderr.strip()[-500:]}")
    return Outcome(case.name, case.kind, False, f"accepted ({result!r})"[:500])
