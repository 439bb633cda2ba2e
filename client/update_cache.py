"""Updates a DP site has trained, kept beside its ledger so a round is never paid twice.

Under DP the ledger records a round's spend before the update leaves the site. If the
reply is then lost — the site or the server dies before the round is checkpointed — the
server asks for the same (run, round) again; training again would pay twice. So a site
works in this order, all under its ledger lock:

1. train (nothing written yet);
2. store the update here (temp file, fsync, rename): not yet paid, never sent;
3. record the spend in the ledger (durably);
4. reply.

The ledger decides what is paid. Asked for (run, round) again:

- ledger entry and stored update: resend the stored update, spend nothing;
- stored update, no ledger entry (killed between 2 and 3): the update never left the
  site; record its spend, then send it;
- ledger entry, no usable stored update (deleted, corrupt, or recorded by an older
  fedcpt): refuse the round. Training again would count the round twice.

A stored update is resent only for the global adapter it was trained from (a SHA-256 of
the request's tensors). Only the latest round of each run is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from fedcpt.core.adapters import arrays_digest
from fedcpt.core.durable import write_durably
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.ledger import PrivacyLedger, SiteRefused

log = logging.getLogger(__name__)

FORMAT = "fedcpt-paid-update-1"
SUFFIX = ".safetensors"


class UpdateCacheError(FedcptError):
    """A stored update cannot be read or does not match what it claims to be."""


@dataclass(frozen=True)
class StoredUpdate:
    """One round's trained adapter at a site, with what it costs in DP-SGD terms."""

    run: str
    round: int
    request: str  # arrays_digest of the global adapter it was trained from
    arrays: ArrayRecord
    metrics: dict[str, float]  # the reply's non-privacy metrics (num-examples, seconds)
    noise_multiplier: float
    sample_rate: float
    steps: int
    public_sample_rate: float | None = None
    """The public rate it was planned at under public-units (None: none)."""


class UpdateCache:
    """The stored updates of one site: ``<ledger name>.updates/`` beside its ledger."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def beside(cls, ledger_path: Path) -> UpdateCache:
        ledger_path = Path(ledger_path)
        return cls(ledger_path.with_name(ledger_path.name.removesuffix(".json") + ".updates"))

    def _prefix(self, run: str) -> str:
        # run ids come from the server: hash them rather than trust them in a file name
        return hashlib.sha256(run.encode()).hexdigest()[:32]

    def path(self, run: str, server_round: int) -> Path:
        return self.folder / f"{self._prefix(run)}-round-{server_round:06d}{SUFFIX}"

    def store(self, update: StoredUpdate) -> None:
        """Persist ``update`` durably, then drop this run's earlier rounds and stale temps."""
        tensors = {k: np.ascontiguousarray(v.numpy()) for k, v in update.arrays.items()}
        meta = {
            "format": FORMAT, "run": update.run, "round": update.round,
            "request": update.request, "content": arrays_digest(update.arrays),
            "order": list(update.arrays.keys()), "metrics": update.metrics,
            "noise_multiplier": update.noise_multiplier, "sample_rate": update.sample_rate,
            "steps": update.steps, "public_sample_rate": update.public_sample_rate,
        }
        target = self.path(update.run, update.round)
        write_durably(target, save(tensors, metadata={"fedcpt": json.dumps(meta)}))
        for old in self.folder.glob(f"{self._prefix(update.run)}-round-*"):
            number = old.name.split("-round-")[1].removesuffix(SUFFIX)
            if old.name.endswith(".tmp") or (number.isdigit() and int(number) < update.round):
                old.unlink(missing_ok=True)

    def load(self, run: str, server_round: int) -> StoredUpdate | None:
        """The stored update of (run, round), None if there is none; raises
        UpdateCacheError if the file is unreadable or not what its name says."""
        path = self.path(run, server_round)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="np") as fh:
                meta = json.loads((fh.metadata() or {})["fedcpt"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            arrays = ArrayRecord({k: Array(tensors[k]) for k in meta["order"]})
            update = StoredUpdate(
                run=str(meta["run"]), round=int(meta["round"]), request=str(meta["request"]),
                arrays=arrays, metrics=dict(meta["metrics"]),
                noise_multiplier=float(meta["noise_multiplier"]),
                sample_rate=float(meta["sample_rate"]), steps=int(meta["steps"]),
                public_sample_rate=(None if meta.get("public_sample_rate") is None
                                    else float(meta["public_sample_rate"])))
            content = str(meta["content"])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            raise UpdateCacheError(f"stored update {path} is unreadable: {err}") from None
        if meta.get("format") != FORMAT or (update.run, update.round) != (run, server_round):
            raise UpdateCacheError(f"stored update {path} is not round {server_round} of run "
                                   f"{run!r}")
        if arrays_digest(arrays) != content:
            raise UpdateCacheError(f"stored update {path}: checksum mismatch (corrupted)")
        return update

    def discard(self, run: str, server_round: int) -> None:
        self.path(run, server_round).unlink(missing_ok=True)


def reusable_update(ledger: PrivacyLedger, cache: UpdateCache, run: str, server_round: int,
                    request: str) -> StoredUpdate | None:
    """What to send for (run, round) without training, or None to train it now.

    Call under the ledger lock. Returns a stored update that is paid for, or records the
    spend of one that was stored but not yet recorded; raises SiteRefused (a reply that
    says why) when the round is paid for but its update cannot be resent."""
    paid = ledger.entry(run, server_round)
    try:
        stored = cache.load(run, server_round)
    except UpdateCacheError as err:
        if paid is not None:
            raise SiteRefused(f"site {ledger.site!r} already paid for round {server_round} of "
                              f"run {run!r} but cannot resend it ({err}); it will not train "
                              "the round twice") from None
        log.warning("%s; it was never paid for or sent: discarding it", err)
        cache.discard(run, server_round)
        stored = None
    if paid is not None:
        if stored is None:
            raise SiteRefused(f"site {ledger.site!r} already paid for round {server_round} of "
                              f"run {run!r} but holds no stored update for it; it will not "
                              "train the round twice")
        if stored.request != request:
            raise SiteRefused(f"site {ledger.site!r} already paid for round {server_round} of "
                              f"run {run!r}, trained from another global adapter; it will "
                              "not train the round twice")
        if (stored.noise_multiplier, stored.sample_rate, stored.steps) != (
                paid.noise_multiplier, paid.sample_rate, paid.steps):
            raise SiteRefused(f"site {ledger.site!r}: the stored update of round "
                              f"{server_round} of run {run!r} does not match its ledger "
                              "entry; it will not train the round twice")
        log.warning("site %s: round %d of run %s is already paid for; resending the stored "
                    "update, spending nothing", ledger.site, server_round, run)
        return stored
    if stored is None:
        return None
    if stored.request != request:
        log.warning("site %s: discarding an unpaid stored update of round %d of run %s, "
                    "trained from another global adapter", ledger.site, server_round, run)
        cache.discard(run, server_round)
        return None
    public = stored.public_sample_rate
    if ledger.public_units and public is None:
        public = 1.0  # stored before public-units: 1 bounds its q and tells nothing of N
    ledger.check_budget(stored.noise_multiplier, stored.sample_rate, stored.steps,
                        public_sample_rate=public)
    ledger.record(run, server_round, stored.noise_multiplier, stored.sample_rate, stored.steps,
                  public_sample_rate=public)
    log.warning("site %s: round %d of run %s was trained but not recorded before the site "
                "stopped; recorded its spend now and sending it", ledger.site, server_round, run)
    return stored
