"""Wall time of the default run (what `make demo` runs), split into phases, with the CPU
class it ran on. Goal (issue 26): ≤ 600 s on a 2-core CPU with native bf16, ≤ 1,200 s in
fp32 (an AVX2 CPU; `--fp32` stands in for one). `--scenario shakespeare-fedavg` times
plain FedAvg, the default until issue 26 (its goal was 600 s AVX2, 300 s AMX).

Phases come from the run's progress events (:mod:`fedcpt.core.progress`), timed as they
arrive: ``load`` is everything before the first round starts training (preflight, the
SuperLink, Ray, model loads, the round-0 evaluation); per round, ``train`` runs from
training to evaluating and ``evaluate`` (sites' domain loss, then the server's general
loss) from evaluating to done or to the next round's start, whichever is first;
``evaluate_overlapped`` is the general evaluation's time past that, run beside the next
round; ``other`` is the rest (the report).

    python benchmarks/demo_time.py --out results/demo_time.json [--fp32] [--keep RUN_DIR]

``--keep`` leaves the run folder there (e.g. for ``benchmarks/forget.py --run``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import cpu_class, load_average, precision, write

from fedcpt.config import load_config
from fedcpt.core.progress import parse
from fedcpt.simulations.runner import simulate


def phases(marks: list[tuple[float, str, int]], total: float) -> dict[str, float]:
    """Seconds per phase from (time, round state, round) marks, along the critical path.

    A round's evaluation ends when the next round starts training (or, for the last, when
    it is done); what the server's general evaluation runs past that is hidden behind the
    next round's work and kept apart as ``evaluate_overlapped``.
    """
    starts = {r: t for t, state, r in marks if state == "training"}
    evals = {r: t for t, state, r in marks if state == "evaluating"}
    dones = {r: t for t, state, r in marks if state == "done"}
    first = min(starts.values(), default=total)
    train = sum(evals[r] - starts[r] for r in starts if r in evals)
    evaluate = overlapped = 0.0
    for r in evals:
        end = dones.get(r, total)
        if r + 1 in starts:
            overlapped += max(0.0, end - starts[r + 1])
            end = min(end, starts[r + 1])
        evaluate += end - evals[r]
    return {"load": first, "train": train, "evaluate": evaluate,
            "other": total - first - train - evaluate, "evaluate_overlapped": overlapped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="shakespeare")
    parser.add_argument("--fp32", action="store_true",
                        help="force fp32 (stand in for an AVX2 CPU on an AMX machine)")
    parser.add_argument("--keep", type=Path, help="write the run folder here and keep it")
    args = parser.parse_args()
    overrides = ["model.precision=fp32"] if args.fp32 else []
    cfg = load_config(args.scenario, overrides=overrides)
    load_before = load_average()
    marks: list[tuple[float, str, int]] = []
    seen: set[tuple[str, int]] = set()
    start = time.perf_counter()

    def on_line(line: str) -> None:
        event = parse(line)
        if event is None or event.kind != "round":
            return
        key = (str(event.fields.get("state")), int(event.fields.get("round") or 0))
        if key not in seen:  # Flower streams each line twice; the first is on time
            seen.add(key)
            marks.append((time.perf_counter() - start, *key))

    with tempfile.TemporaryDirectory(prefix="fedcpt-demo-") as tmp:
        summary = simulate(cfg, args.keep or Path(tmp) / "run", on_line=on_line)
    total = time.perf_counter() - start
    write(args.out, {
        "benchmark": "demo_time",
        "scenario": args.scenario,
        "cpu_class": cpu_class(),
        "precision": precision(cfg.model),
        "wall_s": total,
        "phases_s": phases(marks, total),
        "adaptation_nats": summary.get("adaptation"),
        "forgetting_nats": summary.get("forgetting"),
        "goal_s": 600 if cpu_class()["native_bf16"] and not args.fp32 else 1200,
        "load_average": [load_before, load_average()],
    })


if __name__ == "__main__":
    main()
