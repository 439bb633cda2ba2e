"""A finished default run beside plain FedAvg's recorded reference (`make demo`'s last
step): adaptation, the three drift measures, ε and wall time, each with the share of plain
FedAvg's and the goal, from the run's summary.json and the reference measures of the goal
benchmark's JSON (benchmarks/default_run.py, on the CPU class it names). The recorded
reference held out its own units, so the shares are indicative; the benchmark runs both on
one split.

    python benchmarks/beside_reference.py RUN_DIR [--reference results/default_run.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import cpu_class

from fedcpt.simulations.default_run import DRIFTS, RunMeasures, goal_report, measures

RESULTS = Path(__file__).resolve().parent / "results" / "default_run.json"
LABELS = {"kl_to_base_out_of_pool": "KL to base, out-of-pool kinds (nats/token)",
          "answer_loss_increase": "rise in loss on the base model's answers (nats)",
          "out_of_pool_forgetting": "out-of-pool forgetting (nats)"}


def _num(value: float | None, fmt: str = "+.4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def table(report: dict, recorded: dict) -> str:
    """The side-by-side table as text."""
    run, ref, met = report["default"], report["reference"], report["goals_met"]
    cpu = recorded.get("cpu_class", {})
    lines = [f"{'':52s} {'this run':>10s} {'plain FedAvg*':>14s} {'share':>7s}  goal",
             f"{'adaptation (nats)':52s} {_num(run['adaptation']):>10s} "
             f"{_num(ref['adaptation']):>14s} {_pct(report['adaptation_kept']):>7s}  "
             f"≥ 60% {'met' if met['adaptation_kept'] else 'NOT met'}"]
    for name in DRIFTS:
        lines.append(f"{LABELS[name]:52s} {_num(run[name]):>10s} {_num(ref[name]):>14s} "
                     f"{_pct(report['drift_share'][name]):>7s}  "
                     f"≤ 20% {'met' if met[name] else 'NOT met'}")
    lines += [f"{'ε per unit (max over sites)':52s} {_num(run['epsilon'], '.3f'):>10s} "
              f"{'—':>14s} {'':>7s}  ≤ 8 {'met' if met['epsilon'] else 'NOT met'}",
              f"{'wall time (s)':52s} {run['wall_s']:>10.0f} {ref['wall_s']:>14.0f} "
              f"{'':>7s}  ≤ {report['goals']['wall_s']:.0f} s "
              f"{'met' if met['wall_s'] else 'NOT met'}",
              f"* recorded by benchmarks/default_run.py on {cpu.get('model', '?')} "
              f"({cpu.get('class', '?')}), {recorded.get('machine', {}).get('date', '?')}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--reference", type=Path, default=RESULTS)
    args = parser.parse_args()
    recorded = json.loads(args.reference.read_text())
    summary = json.loads((args.run_dir / "summary.json").read_text())
    run = measures(summary["name"], [], summary, summary["wall_time_s"], 0.0, args.run_dir)
    report = goal_report(RunMeasures(**recorded["reference"]), run,
                         native_bf16=cpu_class()["native_bf16"])
    print(table(report, recorded))


if __name__ == "__main__":
    main()
