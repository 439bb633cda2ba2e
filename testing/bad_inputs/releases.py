"""Releases a hostile server asks of a deployed site that the site must answer and pay
for: each is sent to the site's real handlers, and is *accounted* only if the site's
ledger grew by exactly the releases the attack states from public parameters (σ, the
query's size, the steps), no more, before the answer left (:class:`~.judge.Spent`). Beside
them, a refusal whose reason would state the site's accounting (attack 4b of issue 25).

- attack 2: a noised evaluation, asked twice — each answer is a discrete Gaussian release
  on an integer grid, in the ledger at OpenDP's σ' (the base loss once per site process);
- attack 4a: a noised query far larger than the site's held-out units — answered and paid
  for, whatever the site holds (a free refusal told the server its unit counts);
- attack 7a: a stricter δ the server proposes for one run — the run is held to it, the
  round paid once, and the ledger keeps the site's own δ.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedcpt.core import protocol as p
from fedcpt.privacy.discrete_noise import accounted_noise_multiplier
from fedcpt.privacy.plan import EVAL_RUN_SUFFIX
from fedcpt.testing.bad_inputs.judge import ACCOUNTED, BadInput, Spent, ledger_entries
from fedcpt.testing.bad_inputs.proposals import RUN, _hostile, exchange

EVAL_SIGMA = 2.0  # the site's public eval-noise-multiplier
NOISED = {"eval-release": "noised", "eval-noise-multiplier": str(EVAL_SIGMA)}
SITE_DELTA = 1e-7  # the site's own δ (node config)


def _eval_entry(answer: int, statistics: int) -> dict:
    """The ledger entry a noised evaluation answer states: ``statistics`` releases of the
    discrete Gaussian at the site's public σ, each over the whole query (q = 1)."""
    return {"run": RUN + EVAL_RUN_SUFFIX, "round": answer, "kind": "eval", "sample_rate": 1.0,
            "noise_multiplier": accounted_noise_multiplier(EVAL_SIGMA), "steps": statistics}


def _answered(overrides: list[str], handler: str, stated: tuple[dict, ...], asks: int = 1,
              kept: dict | None = None, **policy: str) -> Callable[[Path], object]:
    """Ask a deployed site ``asks`` times; :class:`Spent` if it answered every time."""
    def attempt(folder: Path) -> object:
        before = ledger_entries(folder / "clinic.ledger.json")
        sent_back = exchange(folder, overrides, handler, asks=asks, **policy)
        refused = [r.error.reason for r in sent_back.replies if r.has_error()]
        if refused:
            return f"refused where it must answer and pay: {refused} | {sent_back.logged}"
        answers = [", ".join(f"{k}={v:g}" for k, v in sorted(r.content[p.METRICS].items()))
                   for r in sent_back.replies]
        return Spent(sent_back.ledger, before, stated,
                     f"{handler} answered {len(answers)}x: {answers[-1]}", kept or {})
    return attempt


RELEASE = [
    BadInput("release-noised-evaluation-asked-twice", "release",
             _answered([], "evaluate", (_eval_entry(1, 3), _eval_entry(2, 2)), asks=2,
                       **NOISED),
             r"evaluate answered 2x: .*domain-loss=.*; ledger \+2: eval", ACCOUNTED, "2"),
    BadInput("release-noised-query-above-holdings", "release",
             _answered(["data.heldout_blocks=400"], "evaluate", (_eval_entry(1, 3),), **NOISED),
             r"num-examples=25200; ledger \+1: eval", ACCOUNTED, "4a"),
    BadInput("release-stricter-delta-for-one-run", "release",
             _answered(["privacy.target_delta=1e-12", "privacy.noise_multiplier=1.0",
                        "train.local_steps=1"], "train",
                       ({"run": RUN, "round": 1, "kind": "train", "noise_multiplier": 1.0,
                         "steps": 1},), kept={"delta": SITE_DELTA}, delta=str(SITE_DELTA)),
             r"train answered 1x: .*; ledger \+1: train hostile-run round 1: σ=1, q=[\d.e-]+, "
             r"1 steps$", ACCOUNTED, "7a"),
    BadInput("release-budget-refusal-states-nothing", "release",
             _hostile(["privacy.target_epsilon=0.0001"], **{"epsilon-budget": "0.0001"}),
             r"privacy budget ε=0.0001, δ=[\d.e-]+ is too small for \d+ steps at sample rate",
             attack="4b"),
]
