"""What a run has learned so far, and ``checkpoint.json``: all ``--resume`` needs to go on
after the last finished round (written after every round, after that round's version)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fedcpt.core.durable import write_json
from fedcpt.core.retention import GeneralReport
from fedcpt.runfolder.paths import RunFolder
from fedcpt.strategies.base import SiteEvalReport, SiteTrainReport


@dataclass(frozen=True)
class TrainOutcome:
    """One round's training as the round loop recorded it."""

    reports: list[SiteTrainReport]
    failures: list[str]
    aggregated: bool
    """Whether the round changed the global adapter."""


@dataclass(frozen=True)
class PendingGeneral:
    """A round whose version is saved and whose general evaluation is not yet recorded:
    what its metrics line needs besides that evaluation."""

    round: int
    update_norm: float | None
    """The round's global update norm, for the drift check (None: the round kept the
    global adapter)."""
    data_flags: list[str]
    sent: str
    """SHA-256 of the global adapter the round's training request carried."""


@dataclass
class RunState:
    """Per-round results the summary and the report are built from."""

    run_id: str
    started: float = field(default_factory=time.time)
    full_model_bytes: int = 0
    general: dict[int, GeneralReport] = field(default_factory=dict)
    """The server's general evaluation of each committed round (checkpointed: base, last)."""
    domain_base: dict[str, float] = field(default_factory=dict)
    """Each site's base-model domain loss, as it first reported it."""
    train: dict[int, TrainOutcome] = field(default_factory=dict)
    evals: dict[int, list[SiteEvalReport]] = field(default_factory=dict)
    steps: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    pending: PendingGeneral | None = None
    """The last round, when its version is saved but its general evaluation is not yet
    recorded (a resumed run evaluates it first)."""

    def save(self, folder: RunFolder, last_round: int, phase: int,
             random_state: list) -> None:
        """Write ``checkpoint.json`` after ``last_round`` finished; ``random_state``: the
        sampling RNG's state then (:func:`encode_random`)."""
        write_json(folder.checkpoint, {
            "last_round": last_round,
            "phase": phase,
            "elapsed_s": time.time() - self.started,
            "full_model_bytes": self.full_model_bytes,
            # the summary needs only the base and the latest evaluation
            "general": {r: self.general[r].to_dict() for r in {0, last_round}
                        if r in self.general},
            "pending": None if self.pending is None else asdict(self.pending),
            "domain_base": self.domain_base,
            "train": {r: asdict(t) for r, t in self.train.items()},
            "eval": {r: [asdict(x) for x in reports] for r, reports in self.evals.items()},
            "steps": self.steps,
            "random_state": random_state,
        })

    @classmethod
    def load(cls, folder: RunFolder, run_id: str,
             rng: random.Random) -> tuple[RunState, int, int]:
        """The state saved in ``checkpoint.json``, its last round and phase; restores the
        sampling ``rng``."""
        raw = json.loads(folder.checkpoint.read_text())
        state = cls(
            run_id=run_id,
            started=time.time() - raw["elapsed_s"],
            full_model_bytes=raw["full_model_bytes"],
            general={int(r): GeneralReport.from_dict(e) for r, e in raw["general"].items()},
            domain_base=raw["domain_base"],
            train={int(r): TrainOutcome([SiteTrainReport(**x) for x in t["reports"]],
                                        t["failures"], t["aggregated"])
                   for r, t in raw["train"].items()},
            evals={int(r): [SiteEvalReport(**x) for x in v] for r, v in raw["eval"].items()},
            steps={int(r): v for r, v in raw["steps"].items()},
            pending=PendingGeneral(**raw["pending"]) if raw.get("pending") else None,
        )
        rng.setstate(_decode_random(raw["random_state"]))
        return state, int(raw["last_round"]), int(raw.get("phase", 0))


def encode_random(rng: random.Random) -> list:
    """``rng``'s state as JSON can hold it."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _decode_random(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
