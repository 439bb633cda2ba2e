"""Per-site data drift: the base model's released held-out loss on the site's data this run
against its previous runs, kept in a record at the site.

The base model never changes within a model id (a digest of its weights), so with the same
model and the same way of measuring (release mode, query size, block length, loss bound)
a change of the base loss is a change of the site's held-out data. The record holds, per
run, the base loss *as released* (plain: exact; noised: the noised value), so the drift
the site releases, ``base loss now − mean over its previous runs``, is a function of
releases only: post-processing, no new privacy cost. The file is
``<site>.data-drift.json`` beside ``<site>.ledger.json``; it never leaves the site.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedcpt.core.durable import write_durably
from fedcpt.core.model import AdaptedModel
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.site_files import beside_ledger

log = logging.getLogger(__name__)

DRIFT_SUFFIX = ".data-drift.json"
VERSION = 1
MAX_RUNS = 100
"""Runs a record keeps (the most recent): a server cannot grow a site's file without bound
by sending run ids."""


class DataDriftError(FedcptError):
    """A data-drift record is corrupt or belongs to another site."""


def drift_path(ledger_path: Path) -> Path:
    """``<site>.data-drift.json`` beside ``<site>.ledger.json``."""
    return beside_ledger(ledger_path, DRIFT_SUFFIX)


@dataclass(frozen=True)
class RunEntry:
    """One run's released base loss on the site's held-out data."""

    run: str
    model: str
    """Digest of the base model's weights (and its compute dtype)."""
    measure: str
    """How the loss was measured: release mode, query blocks × block length, loss bound."""
    data: str
    """Digest of the held-out token blocks the base loss was measured on (site-only)."""
    base_loss: float
    """The base loss as released (nats/token)."""
    tokens: int


def model_digest(lm: AdaptedModel) -> str:
    """SHA-256 of the base model's weights (not the adapter's) and its compute dtype."""
    h = hashlib.sha256(str(lm.autocast_dtype).encode())
    for name, param in lm.model.named_parameters():
        if "lora_" not in name:
            h.update(name.encode())
            h.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def blocks_digest(blocks: torch.Tensor) -> str:
    """SHA-256 of a tensor of token blocks."""
    return hashlib.sha256(blocks.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:32]


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


class DataDriftRecord:
    """The data-drift record of one site (read and checked when opened)."""

    def __init__(self, path: Path, site: str, runs: list[RunEntry] | None = None) -> None:
        self.path, self.site = Path(path), site
        self.runs = list(runs or [])

    @classmethod
    def open(cls, path: Path, site: str) -> DataDriftRecord:
        """The record at ``path`` (empty if there is none yet); DataDriftError if it is
        corrupt, was edited, or is another site's."""
        path = Path(path)
        if not path.exists():
            return cls(path, site)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            body = {k: v for k, v in payload.items() if k != "checksum"}
            ok = _checksum(body) == payload["checksum"]
            runs = [RunEntry(str(r["run"]), str(r["model"]), str(r["measure"]),
                             str(r["data"]), float(r["base_loss"]), int(r["tokens"]))
                    for r in body["runs"]]
            owner, version = str(body["site"]), body["version"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataDriftError(f"{path} is not a valid data-drift record: {err!r}. "
                                 "Move it aside to start a new one") from None
        if not ok:
            raise DataDriftError(f"{path}: checksum mismatch: the data-drift record was "
                                 "modified. Move it aside to start a new one")
        if version != VERSION:
            raise DataDriftError(f"{path}: unsupported data-drift record version {version!r} "
                                 f"(this fedcpt reads version {VERSION})")
        if owner != site:
            raise DataDriftError(f"{path} is the data-drift record of site {owner!r}, "
                                 f"not {site!r}")
        return cls(path, site, runs)

    def record_run(self, entry: RunEntry) -> float | None:
        """Record ``entry`` as its run's base loss (replacing an earlier one of that run)
        and return the data drift: its base loss minus the mean over the previous runs with
        the same model and measure (None: there is none). Merged with the file under a
        lock, so two processes of one site keep both runs."""
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.runs = DataDriftRecord.open(self.path, self.site).runs
                previous = [r.base_loss for r in self.runs if r.run != entry.run
                            and (r.model, r.measure) == (entry.model, entry.measure)]
                self.runs = [r for r in self.runs if r.run != entry.run] + [entry]
                self.runs = self.runs[-MAX_RUNS:]
                write_durably(self.path, self._payload())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        if not previous:
            log.info("site %s: no previous run with this base model and measure; no data "
                     "drift this run", self.site)
            return None
        drift = entry.base_loss - statistics.fmean(previous)
        log.info("site %s: data drift %+.4f nats (base loss %.4f against the mean of %d "
                 "previous runs)", self.site, drift, entry.base_loss, len(previous))
        return drift

    def _payload(self) -> bytes:
        body = {"version": VERSION, "site": self.site, "runs": [asdict(r) for r in self.runs]}
        return json.dumps(dict(body, checksum=_checksum(body)), indent=1).encode("utf-8")
