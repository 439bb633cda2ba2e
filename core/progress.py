"""A run's progress as plain log lines, the one channel that reaches a terminal from the
ServerApp's process under ``flwr run`` (its logs are streamed back as text).

Each event is one INFO line on the ``fedcpt.progress`` logger::

    progress site round=2 site="comedies" state="done" loss=3.2107 epsilon=0.41

Under ``flwr run`` a person reads these lines as they are; ``fedcpt simulate`` parses
them back (:func:`parse`) into its live view.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass

log = logging.getLogger("fedcpt.progress")

EVENTS = ("run", "round", "site")
"""run: rounds, sites; round: round, state (training/evaluating/done) and metrics;
site: round, site, state (training/evaluating/done/failed), loss, epsilon."""

_LINE = re.compile(r"\bprogress (run|round|site)((?: [a-z_]+=(?:\"(?:[^\"\\]|\\.)*\"|\S+))*)\s*$")
_FIELD = re.compile(r"([a-z_]+)=(\"(?:[^\"\\]|\\.)*\"|\S+)")

Value = str | int | float | bool | None


@dataclass(frozen=True)
class ProgressEvent:
    kind: str
    fields: dict[str, Value]


DECIMALS = 4
"""Floats are shown to this many decimals: a loss to 0.1 mnat, ε to 0.0001."""


def emit(kind: str, **fields: Value) -> None:
    """Log one progress event (values JSON-encoded, so a site name may hold spaces). A
    field that is None (no loss under DP) is left out, not shown null."""
    if kind not in EVENTS:
        raise ValueError(f"unknown progress event {kind!r}")  # a bug, never user input
    text = " ".join(f"{k}={json.dumps(round(v, DECIMALS) if isinstance(v, float) else v)}"
                    for k, v in fields.items() if v is not None)
    log.info("progress %s %s", kind, text)


def parse(line: str) -> ProgressEvent | None:
    """The event in a log line (with any prefix a log handler added), or None."""
    match = _LINE.search(line)
    if match is None:
        return None
    try:
        fields = {k: json.loads(v) for k, v in _FIELD.findall(match.group(2))}
    except json.JSONDecodeError:
        return None
    return ProgressEvent(match.group(1), fields)


def stream_plain_lines() -> None:
    """Send fedcpt's INFO lines, progress included, to stderr as plain text: in the
    ServerApp's process under ``flwr run``, Flower streams that back to the caller."""
    logger = logging.getLogger("fedcpt")
    if any(getattr(h, "fedcpt_plain", False) for h in logger.handlers):
        return  # a SuperLink reuses its process for later runs
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.fedcpt_plain = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
