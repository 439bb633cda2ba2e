"""Bad ledgers and stored updates: a site's privacy ledger tampered with, truncated, of
another site or out of budget, and a paid round whose stored update is missing or
corrupt; the data-drift record beside the ledger tampered with, truncated or another
site's. Each must be refused before the site trains, resends or releases."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fedcpt.client.update_cache import UpdateCache, reusable_update
from fedcpt.privacy.data_drift import DataDriftRecord, RunEntry
from fedcpt.privacy.data_drift import _checksum as _drift_checksum
from fedcpt.privacy.ledger import PrivacyLedger, _checksum
from fedcpt.testing.bad_inputs.judge import BadInput


def _ledger(folder: Path, site: str = "clinic", target: float = 8.0) -> PrivacyLedger:
    return PrivacyLedger.open(folder / "clinic.ledger.json", site, delta=1e-3,
                              target_epsilon=target)


def recorded_ledger(folder: Path) -> Path:
    """The path of clinic's ledger in ``folder``, with one round recorded."""
    _ledger(folder).record("run", 1, 1.0, 0.01, 10)
    return folder / "clinic.ledger.json"


def tamper(path: Path, change: Callable[[dict], None], recompute_checksum: bool = False,
           ) -> None:
    """Edit the ledger file at ``path`` in place, as someone with write access to it would."""
    payload = json.loads(path.read_text())
    change(payload)
    if recompute_checksum:
        payload["checksum"] = _checksum({k: v for k, v in payload.items() if k != "checksum"})
    path.write_text(json.dumps(payload))


def fewer_steps(payload: dict) -> None:
    """Claim the first round took a single DP-SGD step (an under-reported ε)."""
    payload["entries"][0]["steps"] = 1


def _edit(change: Callable[[dict], None], recompute_checksum: bool = False,
          ) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        tamper(recorded_ledger(folder), change, recompute_checksum)
        return _ledger(folder)
    return attempt


def _write_ledger(text: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        (folder / "clinic.ledger.json").write_text(text)
        return _ledger(folder)
    return attempt


def _truncated(folder: Path) -> object:
    path = recorded_ledger(folder)
    path.write_text(path.read_text()[:-40])
    return _ledger(folder)


def _exhausted(folder: Path) -> object:
    ledger = _ledger(folder, target=1.0)
    ledger.record("run", 1, 1.0, 0.05, 100)
    return ledger.check_budget(0.5, 0.05, 100)


def _twice(folder: Path) -> object:
    ledger = _ledger(folder)
    ledger.record("run", 1, 1.0, 0.01, 10)
    return ledger.record("run", 1, 1.0, 0.01, 10)


def _paid_without_update(folder: Path) -> object:
    ledger = _ledger(folder)
    ledger.record("run", 1, 1.0, 0.01, 10)
    return reusable_update(ledger, UpdateCache.beside(ledger.path), "run", 1, "request")


def _paid_with_corrupt_update(folder: Path) -> object:
    ledger = _ledger(folder)
    ledger.record("run", 1, 1.0, 0.01, 10)
    cache = UpdateCache.beside(ledger.path)
    cache.path("run", 1).parent.mkdir(parents=True, exist_ok=True)
    cache.path("run", 1).write_bytes(b"\x08\0\0\0\0\0\0\0{}garbage")
    return reusable_update(ledger, cache, "run", 1, "request")


def _drift_record(change: Callable[[str], str], site: str = "clinic",
                  ) -> Callable[[Path], object]:
    """clinic's data-drift record with one run, its text changed by ``change``, opened by
    ``site``."""
    def attempt(folder: Path) -> object:
        path = folder / "clinic.data-drift.json"
        DataDriftRecord(path, "clinic").record_run(
            RunEntry("run", "model", "plain 8x64", "data", 5.5, 504))
        path.write_text(change(path.read_text()))
        return DataDriftRecord.open(path, site)
    return attempt


def _drift_version(text: str) -> str:
    payload = json.loads(text)
    payload["version"] = 99
    payload["checksum"] = _drift_checksum({k: v for k, v in payload.items() if k != "checksum"})
    return json.dumps(payload)


def _entries(payload: dict) -> list:
    return payload["entries"]


LEDGER = [
    BadInput("ledger-tampered", "ledger", _edit(fewer_steps), r"checksum mismatch"),
    BadInput("ledger-checksum-removed", "ledger", _edit(lambda p: p.pop("checksum")),
             r"not a valid privacy ledger"),
    BadInput("ledger-truncated", "ledger", _truncated, r"not a valid privacy ledger"),
    BadInput("ledger-not-json", "ledger", _write_ledger("{not json"),
             r"not a valid privacy ledger"),
    BadInput("ledger-not-an-object", "ledger", _write_ledger("[]"), r"not a JSON object"),
    BadInput("ledger-unknown-version", "ledger", _edit(lambda p: p.update(version=99), True),
             r"unsupported ledger version 99"),
    BadInput("ledger-entry-unknown-field", "ledger",
             _edit(lambda p: _entries(p)[0].update(spent="none"), True),
             r"not a valid privacy ledger"),
    BadInput("ledger-of-another-site", "ledger",
             lambda f: (recorded_ledger(f), _ledger(f, site="newsroom")),
             r"ledger of site 'clinic', not 'newsroom'"),
    BadInput("ledger-missing-file", "ledger",
             lambda f: PrivacyLedger.load(f / "clinic.ledger.json"), r"ledger not found"),
    BadInput("ledger-budget-exhausted", "ledger", _exhausted, r"refuses to train"),
    BadInput("ledger-round-recorded-twice", "ledger", _twice, r"already recorded round 1"),
    BadInput("ledger-paid-round-without-stored-update", "ledger", _paid_without_update,
             r"already paid for round 1 .* no stored update"),
    BadInput("ledger-paid-round-with-corrupt-stored-update", "ledger",
             _paid_with_corrupt_update, r"cannot resend it .*unreadable"),
    BadInput("data-drift-record-tampered", "ledger",
             _drift_record(lambda t: t.replace('"base_loss": 5.5', '"base_loss": 0.5')),
             r"checksum mismatch: the data-drift record was modified"),
    BadInput("data-drift-record-truncated", "ledger", _drift_record(lambda t: t[:-40]),
             r"not a valid data-drift record"),
    BadInput("data-drift-record-not-an-object", "ledger", _drift_record(lambda t: "[]"),
             r"not a valid data-drift record"),
    BadInput("data-drift-record-unknown-version", "ledger", _drift_record(_drift_version),
             r"unsupported data-drift record version 99"),
    BadInput("data-drift-record-of-another-site", "ledger",
             _drift_record(lambda t: t, site="newsroom"),
             r"data-drift record of site 'clinic', not 'newsroom'"),
]
