"""Where a site keeps its own records: each beside its ledger, named after it."""

from __future__ import annotations

from pathlib import Path

LEDGER_SUFFIX = ".ledger.json"


def beside_ledger(ledger_path: Path, suffix: str) -> Path:
    """``<site><suffix>`` beside ``<site>.ledger.json`` (or ``<site>.json``)."""
    name = ledger_path.name.removesuffix(LEDGER_SUFFIX).removesuffix(".json")
    return ledger_path.with_name(name + suffix)
