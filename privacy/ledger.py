"""A data site's privacy ledger: every DP-SGD step it has ever taken, kept at the site.

The ledger is the site's own record, independent of any one run: it accumulates across
rounds, process restarts and continual phases, and ε is always recomputed from the full
history. It is written atomically (temp file, fsync, rename) *before* the update it pays
for leaves the site, so a crash never loses spend. Each (run, round) is recorded at most
once: asked for a paid round again, a site resends the update it stored
(:mod:`fedcpt.client.update_cache`) instead of paying twice. A SHA-256 checksum detects
corruption and hand edits; it is not a signature (the site owns its ledger).
The ledger records the site's privacy unit: a history kept for one unit (a document, a
patient) is never composed with rounds run for another (version-1 ledgers predate units:
their unit is ``block``). The stored δ is the site's own: only the site's policy
tightens it; a stricter δ the server proposes applies to its run alone (``run_delta``).
A site that declares ``public-units`` decides its budget refusals on a public bound: each
entry also records the sample rate its plan used (batch / public-units, at least the real
q), and :meth:`PrivacyLedger.check_budget` composes those, never the real q's; ε itself is
always computed, recorded and reported at the real q's.
Ledger files are named ``<site>.ledger.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from fedcpt.core.durable import write_durably
from fedcpt.exceptions import FedcptError
from fedcpt.privacy.accounting import Step, epsilon

log = logging.getLogger(__name__)

LEDGER_VERSION = 2
LEGACY_UNIT = "block"  # version-1 ledgers: one packed block per record


class LedgerError(FedcptError):
    """A ledger file is corrupt, tampered with, or belongs to another site."""


class SiteRefused(FedcptError):
    """A site declines to train a round (its reply says why; the federation goes on)."""


class PrivacyBudgetExhausted(SiteRefused):
    """Training another round would take a site past its privacy budget."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD at the site."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: str
    kind: str = "train"  # train: DP-SGD steps; eval: a noised evaluation release
    public_sample_rate: float | None = None
    """The public rate the site planned and decided this entry at (batch / public-units);
    None: recorded without public-units (entries of older ledgers too)."""

    @property
    def decision_rate(self) -> float:
        """The sample rate a public-units site decides on for this entry: its public rate;
        an evaluation release's rate, a public constant; else 1 (no public rate was
        recorded, and any function of the real q would tell N: 1 bounds every q)."""
        if self.public_sample_rate is not None:
            return self.public_sample_rate
        return self.sample_rate if self.kind == "eval" else 1.0


def _checksum(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class PrivacyLedger:
    """The persisted DP-SGD history of one site and the ε it adds up to.

    Parameters
    ----------
    path : Path
        The ledger file.
    site : str
        The site's name; a ledger of another site is refused.
    delta : float
        δ at which this process reports and checks ε: the site's own, or a stricter one
        the server proposed for the current run.
    site_delta : float
        δ of the site's guarantee, as stored in the file (default: ``delta``); a run's
        proposal never changes it.
    target_epsilon : float
        The site's total budget.
    accountant : str
        ``prv`` (reported) or ``rdp``.
    unit : str
        The privacy unit every recorded step protects (the site policy's).
    public_units : int
        The site's ``public-units`` (0: none): when set, budget refusals are decided on the
        public bound (:meth:`epsilon_bound`), never on the real q's.
    """

    def __init__(self, path: Path, site: str, *, delta: float, target_epsilon: float,
                 accountant: str = "prv", entries: list[LedgerEntry] | None = None,
                 unit: str = "document", site_delta: float | None = None,
                 public_units: int = 0) -> None:
        self.path = Path(path)
        self.site = site
        self.delta = delta
        self.site_delta = delta if site_delta is None else site_delta
        self.target_epsilon = target_epsilon
        self.accountant = accountant
        self.unit = unit
        self.public_units = public_units
        self.entries: list[LedgerEntry] = list(entries or [])
        # the site policy in force at the last record: each value and who set it
        self.policy: dict[str, dict] = {}

    @classmethod
    def open(cls, path: Path, site: str, *, delta: float, target_epsilon: float,
             accountant: str = "prv", site_sets_budget: bool = False,
             unit: str = "document", run_delta: float | None = None,
             public_units: int = 0) -> PrivacyLedger:
        """Load the site's ledger, or start an empty one if the file does not exist yet.

        ``delta`` is the site's own δ (its policy): a stored δ is kept unless ``delta`` is
        smaller. ``run_delta``, a stricter δ the server proposed, applies to this run only:
        ε is reported and checked at it, but it is never written. The budget stored in an
        existing ledger can be lowered by a run's configuration but only raised by the
        site itself (``site_sets_budget``: its own policy). A ledger of another unit is
        refused. ``public_units`` (the site's, 0: none) makes budget refusals public.
        """
        path = Path(path)
        if not path.exists():
            ledger = cls(path, site, delta=delta, target_epsilon=target_epsilon,
                         accountant=accountant, unit=unit, public_units=public_units)
            ledger.for_run(run_delta)
            return ledger
        ledger = cls.load(path)
        if ledger.site != site:
            raise LedgerError(f"{path} is the ledger of site {ledger.site!r}, not {site!r}")
        if ledger.unit != unit:
            raise LedgerError(
                f"{path} holds a history for privacy unit {ledger.unit!r}, but the site's "
                f"unit is now {unit!r}: histories of different units are never composed; "
                "give this unit its own ledger-path")
        if delta < ledger.site_delta:
            log.warning("ledger %s: the site tightened δ from %.3g to %.3g", path,
                        ledger.site_delta, delta)
            ledger.site_delta = ledger.delta = delta
        elif delta > ledger.site_delta:
            log.warning("ledger %s keeps its δ=%.3g (the site's policy now says δ=%.3g)",
                        path, ledger.site_delta, delta)
        ledger.for_run(run_delta)
        if site_sets_budget or target_epsilon < ledger.target_epsilon:
            ledger.target_epsilon = target_epsilon
        elif target_epsilon > ledger.target_epsilon:
            log.warning("site %s keeps its budget ε=%g: a run cannot raise it to %g", site,
                        ledger.target_epsilon, target_epsilon)
        ledger.accountant = accountant
        ledger.public_units = public_units
        unbounded = [e for e in ledger.entries
                     if e.public_sample_rate is None and e.kind == "train"]
        if public_units and unbounded:
            log.warning("ledger %s: %d training entries were recorded without public-units; "
                        "budget decisions count them at q = 1 (an upper bound on any q), "
                        "as their real q would tell N", path, len(unbounded))
        return ledger

    def for_run(self, run_delta: float | None) -> None:
        """Report and check ε at ``run_delta`` for the current run where it is stricter
        than the site's δ; the file keeps the site's."""
        self.delta = self.site_delta
        if run_delta is not None and run_delta < self.site_delta:
            log.info("ledger %s: this run is held to the server's stricter δ=%.3g (the "
                     "site's δ=%.3g stays recorded)", self.path, run_delta, self.site_delta)
            self.delta = run_delta

    @contextlib.contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold an exclusive lock on the ledger file from the budget check to the record,
        re-reading what another process may have recorded meanwhile."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    self.entries = PrivacyLedger.load(self.path).entries
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Read and verify a ledger file (format, checksum)."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"ledger not found: {path}")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
            body = {k: v for k, v in payload.items() if k != "checksum"}
            checksum = payload["checksum"]
            entries = [LedgerEntry(**e) for e in body["entries"]]
            site, delta = body["site"], float(body["delta"])
        except (ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"{path} is not a valid privacy ledger: {err}") from None
        if body.get("version") not in (1, LEDGER_VERSION):
            raise LedgerError(f"{path}: unsupported ledger version {body.get('version')!r}")
        if _checksum(body) != checksum:
            raise LedgerError(f"{path}: checksum mismatch: the ledger was modified or corrupted")
        ledger = cls(path, site, delta=delta, target_epsilon=float(body["target_epsilon"]),
                     accountant=str(body["accountant"]), entries=entries,
                     unit=str(body.get("unit", LEGACY_UNIT)))
        ledger.policy = dict(body.get("policy", {}))
        # as recorded with the last entry; open() puts the site's policy in force
        ledger.public_units = int(ledger.policy.get("public_units", {}).get("value", 0))
        return ledger

    @property
    def history(self) -> list[Step]:
        """Every entry at its real sample rate: what ε is computed from."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def public_history(self) -> list[Step]:
        """Every entry at its decision rate (:attr:`LedgerEntry.decision_rate`): a function
        of public values only, and ε over it bounds ε over :attr:`history` (ε grows with
        q and no decision rate is below its entry's real q)."""
        return [(e.noise_multiplier, e.decision_rate, e.steps) for e in self.entries]

    @property
    def decision_history(self) -> list[Step]:
        """What budget refusals are decided on: the public history under public-units,
        else the real one."""
        return self.public_history if self.public_units else self.history

    @property
    def steps(self) -> int:
        """DP-SGD steps (noised evaluation releases are entries of kind ``eval``)."""
        return sum(e.steps for e in self.entries if e.kind == "train")

    def epsilon(self, accountant: str | None = None) -> float:
        """Cumulative ε of every recorded step at the ledger's δ."""
        return epsilon(self.history, self.delta, accountant or self.accountant)

    def epsilon_bound(self) -> float:
        """ε over :attr:`decision_history`: the bound budget refusals are decided on (the
        real ε under no public-units, else an upper bound on it)."""
        return epsilon(self.decision_history, self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the site would have after one more round of ``steps`` steps."""
        return epsilon(self.history + [(noise_multiplier, sample_rate, steps)], self.delta,
                       self.accountant)

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int, *,
                     public_sample_rate: float | None = None, action: str = "train",
                     spend: str = "the next round") -> float:
        """Raise PrivacyBudgetExhausted if ``spend`` (the next round, by default) would
        exceed the budget; the message says the site refuses to ``action``. Returns the ε
        the decision was made on.

        Under ``public_units`` the decision composes :attr:`public_history` with the
        spend at ``public_sample_rate`` (required: the public rate the spend was planned
        at), so it depends on public values only; it is never below the real ε after."""
        if not self.public_units:
            after = self.epsilon_after(noise_multiplier, sample_rate, steps)
            before, what = self.epsilon, "ε"
        else:
            if public_sample_rate is None or public_sample_rate < sample_rate:
                raise ValueError(f"a public-units site decides at a public rate at least the "
                                 f"real q={sample_rate:.4g}, got {public_sample_rate!r}")  # bug
            after = epsilon(self.public_history + [(noise_multiplier, public_sample_rate,
                                                    steps)], self.delta, self.accountant)
            before, what = self.epsilon_bound, (f"its public bound on ε (public-units "
                                                f"{self.public_units})")
        if after > self.target_epsilon:
            raise PrivacyBudgetExhausted(
                f"site {self.site!r} refuses to {action}: {spend} would raise {what} from "
                f"{before():.3f} to {after:.3f}, above its budget {self.target_epsilon}"
                f" (δ={self.delta:.3g})")
        return after

    def entry(self, run: str, server_round: int) -> LedgerEntry | None:
        """The recorded round ``server_round`` of run ``run``, or None if it was never paid."""
        return next((e for e in self.entries if e.run == run and e.round == server_round),
                    None)

    def record(self, run: str, server_round: int, noise_multiplier: float, sample_rate: float,
               steps: int, kind: str = "train", public_sample_rate: float | None = None
               ) -> None:
        """Append one round and persist it durably before returning (``public_sample_rate``:
        the public rate it was planned and decided at, under public-units).

        Raises LedgerError if the round is already recorded: a round is paid for once."""
        if self.entry(run, server_round) is not None:
            raise LedgerError(f"site {self.site!r} already recorded round {server_round} of "
                              f"run {run!r}; a round is paid for once")
        self.entries.append(LedgerEntry(
            run=run, round=server_round, noise_multiplier=noise_multiplier,
            sample_rate=sample_rate, steps=steps,
            recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), kind=kind,
            public_sample_rate=public_sample_rate))
        self.save()

    def save(self) -> None:
        body = {
            "version": LEDGER_VERSION,
            "site": self.site,
            "delta": self.site_delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "unit": self.unit,
            "policy": self.policy,
            "entries": [_entry_body(e) for e in self.entries],
        }
        payload = dict(body, checksum=_checksum(body))
        write_durably(self.path, json.dumps(payload, indent=2).encode("utf-8"))


def _entry_body(entry: LedgerEntry) -> dict:
    """An entry as stored; without a public rate it is written as before public-units."""
    body = asdict(entry)
    if body["public_sample_rate"] is None:
        del body["public_sample_rate"]
    return body
