"""One release per question: which secure sums this site has already joined.

A site sends at most one masked training update per (run, round) — and without DP-SGD per
received adapter — and joins at most one un-noised secure-evaluation sum per adapter version. Two
sums that differ by one site give that site's value by subtraction (attacks 5a and 5b of
issue 25: a training round re-sent without one site; four evaluations of one adapter over
different groups of three sites); a site that joins each question once leaves the server
one sum per question. Noised evaluations are exempt: each is paid for in the ledger, so
repeats are accounted.

The record is kept beside the site's ledger (``<name>.participation.json``), so it holds
across runs and restarts; a site without a ledger location keeps it in its Flower
``Context.state``, i.e. for the current run only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedcpt.core.durable import write_json
from fedcpt.exceptions import UpdateRejected
from fedcpt.privacy.site_files import beside_ledger

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".participation.json"
_STATE_KEY = "secagg-participation"


class AlreadyReleased(UpdateRejected):
    """The site already answered this question in another secure sum."""


def record_path(ledger: Path) -> Path:
    """The participation record beside the site's ledger."""
    return beside_ledger(ledger, RECORD_SUFFIX)


def training_questions(run_id: str, server_round: int, adapter_digest: str,
                       fresh_noise: bool) -> list[str]:
    """What one masked training update answers: the (run, round), and — unless DP-SGD
    trains it with fresh, accounted noise — the adapter it was trained from (without DP a
    round re-sent under another run id trains the very same update)."""
    questions = [f"train/run/{run_id}/round/{server_round}"]
    return questions if fresh_noise else [*questions, f"train/adapter/{adapter_digest}"]


def evaluation_questions(adapter_digest: str) -> list[str]:
    """What one masked evaluation answers: the adapter version it evaluates."""
    return [f"evaluate/adapter/{adapter_digest}"]


def _read(path: Path) -> list[str]:
    if not path.exists():
        return []
    try:
        claims = json.loads(path.read_text(encoding="utf-8"))["claims"]
        return [str(c) for c in claims]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise UpdateRejected(f"participation record {path} is damaged ({err!r}); the site "
                             "joins no secure sum until it is restored") from None


def claim(context: Context, ledger_path: str, questions: list[str]) -> None:
    """Record that this site answers ``questions`` now; AlreadyReleased (nothing recorded)
    if it answered any of them before. Durable before the answer is computed."""
    if ledger_path:
        path = record_path(Path(ledger_path).expanduser())
        claims = _read(path)
    else:
        record = context.state.config_records.get(_STATE_KEY)
        claims = [] if record is None else [str(c) for c in record["claims"]]
    seen = [q for q in questions if q in claims]
    if seen:
        raise AlreadyReleased(f"this site already joined a secure sum answering {seen[0]}; "
                              "a second sum would give its value by subtraction")
    claims += questions
    if ledger_path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"claims": claims})
    else:
        context.state.config_records[_STATE_KEY] = ConfigRecord({"claims": claims})
    log.info("secure sum joined for %s", ", ".join(questions))
