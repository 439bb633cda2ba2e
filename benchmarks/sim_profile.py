"""Where a simulation's wall time and CPU go: ``fedcpt simulate`` as a subprocess, its whole
process tree sampled every 0.2 s.

Reports the wall time; CPU seconds per role (the CLI, the reaper, the SuperLink, SuperExec,
``flwr run``, ``flwr-simulation`` (the ServerApp), Ray's daemons, the ClientApp workers);
the phases between landmark lines of ``run.log`` (the CLI's imports, its preflight, the
engine's start, the ServerApp's start, each round, the report, the shutdown) with the CPU
the tree used in each; and the samples in which no process of the tree used CPU. On a
shared machine CPU seconds vary less than wall time, but both grow with the load: compare
runs made at the same time, interleaved.

    python benchmarks/sim_profile.py smoke-dp --out results/sim_profile.json [--set K=V]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import cpu_class, write

ROLES = [  # (role, a marker of its command line), first match wins
    ("reaper", "fedcpt.simulations.reaper"), ("superlink", "flower-superlink"),
    ("superexec", "flower-superexec"), ("serverapp", "flwr-simulation"),
    ("flwr-run", "bin/flwr run"), ("clientapp-worker", "ClientAppActor"),
    ("ray", "ray"), ("cli", "fedcpt simulate")]
PHASES = [  # (phase ending at the first run.log line containing the marker, marker)
    ("cli imports", "fedcpt.core.model: Loaded"), ("cli preflight", "Simulating"),
    ("engine start", "Starting Flower Simulation"), ("serverapp start", "fedcpt job 1 of"),
    ("server model and general data", 'round=1 state="training"'),
    ("round 1 (with Ray's and the workers' start)", 'round=2 state="training"'),
    ("round 2", 'round=2 state="done"'), ("report", "run finished")]


def role(proc: psutil.Process) -> str:
    try:
        cmd = " ".join([proc.name(), *proc.cmdline()])
    except psutil.Error:
        return ""
    return next((name for name, marker in ROLES if marker in cmd), "other")


def profile(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; sample its tree until every process of it has exited."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds so far)
    marks: dict[str, float] = {}
    timeline: list[tuple[float, float]] = []  # (seconds since start, tree CPU seconds)
    while True:
        now = time.monotonic() - start
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                times = p.cpu_times()
                name = role(p)
            except psutil.Error:
                continue
            known = cpu.get(p.pid, (name, 0.0))[0]
            # a forked child shows its parent's command line until it execs, an exited one
            # none, and a Ray worker its actor's name only while it hosts it
            keep = name in ("", "other") or (known, name) == ("clientapp-worker", "ray")
            cpu[p.pid] = (known if keep else name, times.user + times.system)
        timeline.append((now, sum(seconds for _, seconds in cpu.values())))
        if log.is_file():
            text = log.read_text(errors="replace")
            for phase, marker in PHASES:
                if phase not in marks and marker in text:
                    marks[phase] = now
        if proc.poll() is not None and len(procs) <= 1:
            break
        time.sleep(0.2)
    wall = time.monotonic() - start
    by_role: dict[str, float] = {}
    for name, seconds in cpu.values():
        by_role[name] = by_role.get(name, 0.0) + seconds
    return {"exit_code": proc.returncode, "wall_s": round(wall, 1),
            "cpu_s": round(timeline[-1][1], 1),
            "cpu_s_by_role": {k: round(v, 1) for k, v in sorted(by_role.items())},
            "phases": _phases(marks, timeline, wall),
            "idle_samples": sum(1 for (_, a), (_, b) in itertools.pairwise(timeline)
                                if b - a < 0.01),
            "samples": len(timeline)}


def _phases(marks: dict[str, float], timeline: list[tuple[float, float]],
            wall: float) -> list[dict]:
    def cpu_at(t: float) -> float:
        return max((c for s, c in timeline if s <= t), default=0.0)

    ends = sorted(marks.items(), key=lambda item: item[1]) + [("shutdown", wall)]
    rows, previous = [], 0.0
    for phase, end in ends:
        rows.append({"phase": phase, "wall_s": round(end - previous, 1),
                     "cpu_s": round(cpu_at(end) - cpu_at(previous), 1)})
        previous = end
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fedcpt = shutil.which("fedcpt", path=str(Path(sys.executable).parent)) or "fedcpt"
    with tempfile.TemporaryDirectory(prefix="sim-profile-") as folder:
        run_dir = Path(folder) / "run"
        cmd = [fedcpt, "simulate", args.scenario, "--out", str(run_dir)]
        for override in args.overrides:
            cmd += ["--set", override]
        result = profile(cmd, run_dir / "run.log")
    load = os.getloadavg()
    write(args.out, {"scenario": args.scenario, "overrides": args.overrides,
                     "cpu_class": cpu_class(),
                     "load_average_after": [round(x, 2) for x in load], **result})


if __name__ == "__main__":
    main()
