"""The default run against plain FedAvg: the goal benchmark of the product.

Two ordinary simulations run one after the other on the same held-out split: the
plain-FedAvg scenario as shipped (``shakespeare-fedavg``) and the default run
(``shakespeare``: unit-level DP-SGD at every site, SecAgg+, server-side protection). The
report gives each run's adaptation and the three drift measures, and each as a share of
plain FedAvg's, against the goals:

- adaptation ≥ 60% of plain FedAvg's;
- KL to the base on the general kinds outside the rehearsal pool, the rise in loss on the
  base model's own answers, and forgetting on the out-of-pool kinds, each ≤ 20% of plain
  FedAvg's;
- ε per unit within the site's budget; wall time within the CPU class's goal.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from fedcpt.config import load_config
from fedcpt.privacy.heldout import share_splits
from fedcpt.simulations.compare import share
from fedcpt.simulations.runner import simulate

log = logging.getLogger(__name__)

REFERENCE = "shakespeare-fedavg"
DEFAULT = "shakespeare"
ADAPTATION_GOAL = 0.6
"""The default run keeps at least this share of plain FedAvg's adaptation."""
DRIFT_GOAL = 0.2
"""Each drift measure of the default run is at most this share of plain FedAvg's."""
EPSILON_GOAL = 8.0
WALL_GOAL_S = {"native bf16": 600.0, "fp32": 1200.0}
HELDOUT_TOLERANCE = 1e-3
"""The most the two runs' base domain losses may differ: both measure the same held-out
blocks (a reused reference from older code may not; under SecAgg+ the default's base is a
quantised sum)."""
"""Wall time of the default run on a 2-core CPU: native bf16, or fp32 (an AVX2 CPU)."""


@dataclass(frozen=True)
class RunMeasures:
    """What one run measured: adaptation, the three drift measures, ε, time."""

    scenario: str
    overrides: list[str]
    domain_base: float | None
    """The base model's held-out domain loss: the same in two runs on one split."""
    adaptation: float | None
    kl_to_base_out_of_pool: float | None
    answer_loss_increase: float | None
    out_of_pool_forgetting: float | None
    exact_match_base: float | None
    exact_match: float | None
    forgetting: float
    epsilon: float | None
    delta: float | None
    wall_s: float
    cpu_s: float
    """CPU seconds of the run's whole process tree (:class:`TreeCPU`)."""
    run_dir: str


def measures(scenario: str, overrides: list[str], summary: dict[str, Any], wall_s: float,
             cpu_s: float, run_dir: Path) -> RunMeasures:
    """One run's measures from its summary (None where the run did not measure one)."""
    retention = summary.get("retention") or {}
    out_of_pool = retention.get("out_of_pool") or {}
    behaviour = retention.get("behaviour") or {}
    privacy = summary.get("privacy") or {}
    return RunMeasures(
        scenario=scenario, overrides=list(overrides),
        domain_base=(summary.get("domain_loss") or {}).get("base"),
        adaptation=summary.get("adaptation"),
        kl_to_base_out_of_pool=out_of_pool.get("kl_to_base"),
        answer_loss_increase=behaviour.get("answer_loss_increase"),
        out_of_pool_forgetting=out_of_pool.get("forgetting"),
        exact_match_base=behaviour.get("exact_match_base"),
        exact_match=behaviour.get("exact_match"),
        forgetting=summary["forgetting"], epsilon=privacy.get("max_epsilon"),
        delta=privacy.get("max_delta"), wall_s=wall_s, cpu_s=cpu_s, run_dir=str(run_dir))


DRIFTS = ("kl_to_base_out_of_pool", "answer_loss_increase", "out_of_pool_forgetting")


def drift_share(default: float | None, reference: float | None) -> float | None:
    """The default run's drift as a share of plain FedAvg's; None when plain FedAvg did
    no damage (a share of nothing says nothing). A negative share: the default run
    improved on the base where plain FedAvg lost."""
    if default is None or reference is None or reference <= 0:
        return None
    return default / reference


def goal_report(reference: RunMeasures, default: RunMeasures, native_bf16: bool
                ) -> dict[str, Any]:
    """The default run beside plain FedAvg, its shares of plain FedAvg's, and the goals."""
    kept = share(default.adaptation, reference.adaptation)
    drifts = {name: drift_share(getattr(default, name), getattr(reference, name))
              for name in DRIFTS}
    wall_goal = WALL_GOAL_S["native bf16" if native_bf16 else "fp32"]
    met = {"adaptation_kept": kept is not None and kept >= ADAPTATION_GOAL,
           **{name: value is not None and value <= DRIFT_GOAL
              for name, value in drifts.items()},
           "epsilon": default.epsilon is not None and default.epsilon <= EPSILON_GOAL,
           "wall_s": default.wall_s <= wall_goal,
           "same_heldout": None not in (reference.domain_base, default.domain_base)
           and abs(reference.domain_base - default.domain_base) <= HELDOUT_TOLERANCE}
    return {"reference": asdict(reference), "default": asdict(default),
            "adaptation_kept": kept, "drift_share": drifts,
            "goals": {"adaptation_kept": ADAPTATION_GOAL, "drift_share": DRIFT_GOAL,
                      "epsilon": EPSILON_GOAL, "wall_s": wall_goal},
            "goals_met": met, "all_goals_met": all(met.values())}


class TreeCPU:
    """CPU seconds of this process and every descendant (the SuperLink, the simulation,
    Ray and its site workers), sampled every ``interval`` seconds by psutil: the
    simulation's processes are not this process's waited-for children, so
    ``RUSAGE_CHILDREN`` would miss them. A process that exits between two samples loses at
    most its last interval's CPU time, so the total is a slight undercount."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                self.seen[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:
                continue  # exited since it was listed: its last sample stands

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeCPU:
        self._sample()
        self.start = sum(self.seen.values())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values()) - self.start


MEASURES = "measures.json"
"""A finished run's measures, written into its folder (what a later benchmark reuses)."""


def run(scenario: str, run_dir: Path, overrides: list[str]) -> RunMeasures:
    """Simulate ``scenario`` with ``overrides`` in ``run_dir``; its measures."""
    cfg = load_config(scenario, None, overrides)
    log.info("default run · %s", scenario)
    wall = time.perf_counter()
    with TreeCPU() as cpu:
        summary = simulate(cfg, run_dir)
    got = measures(scenario, overrides, summary, time.perf_counter() - wall, cpu.seconds,
                   run_dir)
    (run_dir / MEASURES).write_text(json.dumps(asdict(got), indent=2) + "\n")
    return got


def reference_run(scenario: str, run_dir: Path, overrides: list[str]) -> RunMeasures:
    """The reference's measures: run it, or reuse the run this benchmark finished in
    ``run_dir`` before with the same overrides (plain FedAvg does not change between
    trials of the default run; its sites' split records stay in its ledgers)."""
    saved = run_dir / MEASURES
    if saved.is_file():
        got = RunMeasures(**json.loads(saved.read_text()))
        if got.scenario == scenario and got.overrides == overrides:
            log.info("default run · reusing the finished %s run in %s", scenario, run_dir)
            return got
        raise ValueError(f"{run_dir} holds a {got.scenario} run with overrides "
                         f"{got.overrides}, not {overrides}: use another folder")
    return run(scenario, run_dir, overrides)


def default_run(out: Path, reference: str = REFERENCE, default: str = DEFAULT,
                overrides: list[str] | None = None, native_bf16: bool = True,
                default_overrides: list[str] | None = None, tag: str = ""
                ) -> dict[str, Any]:
    """Run ``reference`` then ``default`` under ``out`` (each with ``overrides``; the
    default also with ``default_overrides``, in folder ``<default>-<tag>`` when tagged),
    the default run's sites starting from the reference's split records so that both hold
    out the same units; the goal report. Each run keeps its own ledgers (a fresh budget)."""
    if reference == default:
        raise ValueError("the default run and its reference must be different scenarios")
    overrides = list(overrides or [])
    name = f"{default}-{tag}" if tag else default
    ledgers = {key: (out / key / "ledgers").resolve() for key in (reference, name)}
    ref = reference_run(reference, out / reference,
                        [*overrides, f"privacy.ledger_dir={ledgers[reference]}"])
    share_splits(ledgers[reference], ledgers[name])
    got = run(default, out / name, [*overrides, *(default_overrides or []),
                                    f"privacy.ledger_dir={ledgers[name]}"])
    return goal_report(ref, got, native_bf16)
