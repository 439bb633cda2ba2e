"""The typed rows a run writes, and the one module that writes and reads them:
:class:`RoundRecord` (one line of ``metrics.jsonl`` per round) and :class:`Summary`
(``summary.json``). Their JSON field names are the run folder's public format."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fedcpt.core.durable import write_durably, write_json
from fedcpt.runfolder.paths import RunFolder


def weighted_mean(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


@dataclass(frozen=True)
class RoundRecord:
    """What one round did; round 0 is the starting adapter (evaluated, never trained)."""

    round: int
    phase: str
    general_loss: float | None
    """The server's held-out general loss (None: the round was not evaluated)."""
    general_perplexity: float | None
    general_ece: float | None
    domain_loss: float | None
    domain_per_site: dict[str, float]
    domain_ece: float | None
    aggregated: bool
    """Whether the round changed the global adapter."""
    sites_trained: list[str]
    train_loss: float | None
    update_norm_per_site: dict[str, float]
    bytes_up_per_client: int
    failures: list[str]
    server_steps: dict[str, dict[str, Any]]
    elapsed_s: float
    general_per_kind: dict[str, float] = field(default_factory=dict)
    """General loss per kind of general text."""
    general_kl_to_base: float | None = None
    """Mean per-token KL(base ‖ adapted) over all general text."""
    answer_loss: float | None = None
    """Loss on the base model's own answers to the built-in prompts."""
    answer_exact_match: float | None = None
    """Share of those answers the model reproduces under greedy decoding."""
    update_norm: float | None = None
    """L2 norm of the round's global update (None: the round did not aggregate)."""
    drift: dict[str, Any] = field(default_factory=dict)
    """The drift monitor's signals, flags and rollback (:mod:`fedcpt.server.drift`)."""
    data_drift_per_site: dict[str, float] = field(default_factory=dict)
    """Each evaluated site's released data drift: the base model's held-out loss on its
    data this run minus the mean over its previous runs (nats; absent on a first run)."""
    data_drift_flags: list[str] = field(default_factory=list)
    """A flag per site whose data drift is beyond ``monitor.data_drift_threshold`` (in
    the first round its value arrived); a flag never rolls back."""
    domain_secure: dict[str, Any] | None = None
    """Under secure aggregation, the round's one site evaluation: the sites' sum as
    token-weighted means (``sites``, ``tokens``, ``loss``, ``base_loss``, ``ece``,
    ``clipped``); no per-site value exists (``domain_per_site`` is empty)."""
    evaluated: bool = True
    """Whether the round's adapter was evaluated (``federation.eval_every``): if not, its
    general and domain fields are empty or None."""

    @property
    def rejected_by_guard(self) -> bool:
        return bool(self.server_steps.get("regression_guard", {}).get("rejected"))


@dataclass(frozen=True)
class Summary:
    """The run's result; its presence marks a finished run folder."""

    name: str
    model: str
    num_sites: int
    rounds: int
    rounds_aggregated: int
    general_loss: dict[str, float]
    """``base`` and ``final`` held-out general loss (nats/token)."""
    domain_loss: dict[str, Any]
    """``base``, ``final`` (token-weighted over sites) and ``per_site`` {base, final};
    under secure aggregation also ``secure_sum`` {sites, tokens, base, final} (the sites
    in it have no ``per_site`` entry)."""
    forgetting: float
    forgetting_standard_error: float
    adaptation: float | None
    general_ece: dict[str, float]
    eval_tokens: dict[str, int]
    bytes_up_per_client_round: int
    full_model_bytes: int
    upload_fraction: float | None
    failures: int
    wall_time_s: float
    secagg: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    continual: dict[str, Any] | None = None
    general_kinds: dict[str, Any] | None = None
    """Per kind of general text: its sources, rehearsal share, whether it is in the pool."""
    retention: dict[str, Any] | None = None
    """Forgetting per kind, in and out of the rehearsal pool, and behaviour kept
    (:class:`~fedcpt.core.retention.RetentionSummary`)."""
    privacy: dict[str, Any] | None = None
    """Record-level DP (only when it was on)."""
    privacy_user_level: dict[str, Any] | None = None
    """Site-level DP (only when it was on)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; sections that do not apply are left out, not null."""
        return {k: v for k, v in asdict(self).items()
                if v is not None or k in {"adaptation", "upload_fraction"}}


def append_round(folder: RunFolder, record: RoundRecord) -> None:
    """Append one round's line to ``metrics.jsonl`` and fsync it."""
    with open(folder.metrics, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _round(raw: dict[str, Any]) -> RoundRecord:
    names = {f.name for f in fields(RoundRecord)}
    return RoundRecord(**{k: v for k, v in raw.items() if k in names})


def read_rounds(folder: RunFolder, last: int | None = None) -> list[RoundRecord]:
    """The rounds in ``metrics.jsonl`` (up to ``last``); a line torn by a kill is skipped."""
    if not folder.metrics.is_file():
        return []
    records = []
    for line in folder.metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = _round(json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        if last is None or record.round <= last:
            records.append(record)
    return records


def write_rounds(folder: RunFolder, records: list[RoundRecord]) -> None:
    """Replace ``metrics.jsonl`` with ``records`` (durably)."""
    write_durably(folder.metrics,
                  "".join(json.dumps(asdict(r)) + "\n" for r in records).encode("utf-8"))


def write_summary(folder: RunFolder, summary: Summary) -> None:
    write_json(folder.summary, summary.to_dict())

