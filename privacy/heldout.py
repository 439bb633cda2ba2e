"""The site's held-out split, fixed by a secret salt and recorded beside its ledger.

Which units are held out is decided by a salted hash (:func:`fedcpt.core.data.is_heldout`)
at the site's own fraction: the server neither knows the salt nor sets the fraction, so it
cannot steer a unit into evaluation. Every unit's side is recorded (as a salted digest,
never the key, which may be a patient id) the first time it is seen: a unit once trained
on is never evaluated as held-out, and the reverse, even if the site later changes its
fraction or adds data. The file is ``<site>.split.json`` beside ``<site>.ledger.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from fedcpt.core.data import HeldoutRule, heldout_by_hash, unit_digest
from fedcpt.core.durable import write_durably
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.site_files import beside_ledger

log = logging.getLogger(__name__)

SPLIT_SUFFIX = ".split.json"
SALT_BYTES = 32


class SplitError(FedcptError):
    """A split record is corrupt, or belongs to another site or privacy unit."""


def split_path(ledger_path: Path) -> Path:
    """``<site>.split.json`` beside ``<site>.ledger.json``."""
    return beside_ledger(ledger_path, SPLIT_SUFFIX)


def share_splits(source: Path, target: Path) -> list[Path]:
    """Copy every split record of the ledger folder ``source`` into ``target`` (created),
    for experiments that compare runs of the same simulated sites: with one salt their
    sites hold out the same units, as a real site does across runs, so the runs' held-out
    losses are measured on the same blocks. A different record already in ``target`` is
    never replaced (its ledger may have trained on units the copy would hold out): raises
    SplitError. Returns the copies."""
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for record in sorted(source.glob(f"*{SPLIT_SUFFIX}")):
        copy, body = target / record.name, record.read_bytes()
        if copy.exists() and copy.read_bytes() != body:
            raise SplitError(f"{copy} already holds another held-out split; its sites may "
                             f"have trained on units that {record} holds out. Use a fresh "
                             "output folder")
        copy.write_bytes(body)
        copies.append(copy)
    return copies


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


class HeldoutSplit:
    """The recorded split of one site: its salt and the side of every unit seen."""

    def __init__(self, path: Path, site: str, unit: str, salt: str,
                 sides: dict[str, bool] | None = None) -> None:
        self.path = Path(path)
        self.site, self.unit, self.salt = site, unit, salt
        self.sides: dict[str, bool] = dict(sides or {})  # digest hex → held out

    @classmethod
    def open(cls, path: Path, site: str, unit: str) -> HeldoutSplit:
        """The recorded split, or a new one with a fresh secret salt. Creation is atomic and
        exclusive: two processes of one site starting together agree on one salt."""
        path = Path(path)
        if not path.exists():
            fresh = cls(path, site, unit, secrets.token_hex(SALT_BYTES))
            tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.new")
            write_durably(tmp, fresh._payload())
            try:
                os.link(tmp, path)  # fails if another process created it first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return cls._load(path, site, unit)

    @classmethod
    def _load(cls, path: Path, site: str, unit: str) -> HeldoutSplit:
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            body = {k: v for k, v in payload.items() if k != "checksum"}
            ok = _checksum(body) == payload["checksum"]
            split = cls(path, str(body["site"]), str(body["unit"]), str(body["salt"]),
                        {d: True for d in body["heldout"]} | {d: False for d in body["train"]})
        except (ValueError, KeyError, TypeError) as err:
            raise SplitError(f"{path} is not a valid held-out split record: {err}") from None
        if not ok:
            raise SplitError(f"{path}: checksum mismatch: the split record was modified")
        if split.site != site or split.unit != unit:
            raise SplitError(f"{path} records the split of site {split.site!r} for unit "
                             f"{split.unit!r}, not site {site!r} for unit {unit!r}")
        return split

    def rule(self, fraction: float) -> HeldoutRule:
        """A held-out rule for :func:`fedcpt.core.data.build_blocks` that keeps every
        recorded side, decides new units by the salted hash, and records them."""
        by_hash = heldout_by_hash(fraction, self.salt)

        def decide(keys: Sequence[str]) -> list[bool]:
            digests = [unit_digest(k, self.salt).hex()[:32] for k in keys]
            fresh = [i for i, d in enumerate(digests) if d not in self.sides]
            if len(fresh) == len(keys):
                flags = by_hash(keys)  # a first split: both sides non-empty
            else:
                new = by_hash([keys[i] for i in fresh])
                flags = [self.sides.get(d, False) for d in digests]
                for i, flag in zip(fresh, new, strict=True):
                    flags[i] = flag
            if fresh:
                for i in fresh:
                    self.sides[digests[i]] = flags[i]
                self.save()
                log.info("site %s: %d new units recorded in its held-out split", self.site,
                         len(fresh))
            return flags
        return decide

    @property
    def heldout_units(self) -> int:
        return sum(self.sides.values())

    def save(self) -> None:
        """Merge this process's new sides into the file under a lock (recorded sides win)."""
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                stored = HeldoutSplit._load(self.path, self.site, self.unit)
                self.sides = {**self.sides, **stored.sides}
                write_durably(self.path, self._payload())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _payload(self) -> bytes:
        body = {"version": 1, "site": self.site, "unit": self.unit, "salt": self.salt,
                "heldout": sorted(d for d, h in self.sides.items() if h),
                "train": sorted(d for d, h in self.sides.items() if not h)}
        return json.dumps(dict(body, checksum=_checksum(body)), indent=1).encode("utf-8")
