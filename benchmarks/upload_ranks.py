"""Compact uploads and per-site ranks: bytes per upload and adaptation, arm by arm.

Arms (each a real simulation of ``--scenario``, one after the other, at every seed):

- ``fp32`` / ``bf16`` / ``fp16`` / ``int8``: ``federation.upload_dtype`` at the scenario's
  rank (int8 and the half-precision forms with error feedback at the site);
- ``uniform-8``: every site at rank 8; ``mixed-4-8-16``: the global rank 16, the sites'
  policies capping them at 4, 8 and 16 (HetLoRA zero-padding). Both keep the LoRA scale
  alpha / r = 2.

Reports, per arm and seed, the adaptation (base − final domain loss, mean over sites), the
forgetting, the mean bytes a site uploads per round (a rank-r site sends r/R of the
global adapter's), the wall time,
and the CPU class and load. The JSON is rewritten after every run, so a run cut short
keeps what finished.

    python benchmarks/upload_ranks.py --out results/upload_ranks.json \
        [--scenario smoke] [--arms fp32,bf16,int8] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import cpu_class, load_average, setup, write

from fedcpt.config import load_config
from fedcpt.simulations.runner import simulate

RANK_CAPS = {"uniform-8": (8, (0, 0, 0)), "mixed-4-8-16": (16, (4, 8, 0))}
SCALE = 2  # alpha / r in every rank arm


def arm_config(scenario: str, arm: str, seed: int, folder: Path):
    """The scenario's config for ``arm`` at ``seed``."""
    overrides = [f"seed={seed}"]
    if arm in ("fp32", "bf16", "fp16", "int8"):
        return load_config(scenario, overrides=[*overrides, f"federation.upload_dtype={arm}"])
    rank, caps = RANK_CAPS[arm]
    base = load_config(scenario)
    lines = ["[lora]", f"r = {rank}", f"alpha = {SCALE * rank}", ""]
    for site, cap in zip(base.sites, caps, strict=True):
        lines += ["[[sites]]", f"name = {json.dumps(site.name)}",
                  f"data = {json.dumps(list(site.data))}", "[sites.policy]",
                  f"max_lora_rank = {cap}", ""]
    path = folder / f"{arm}.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return load_config(scenario, config_file=path, overrides=overrides)


def measure(scenario: str, arm: str, seed: int, folder: Path) -> dict:
    cfg = arm_config(scenario, arm, seed, folder)
    run_dir = folder / f"{arm}-seed{seed}"
    start = time.monotonic()
    summary = simulate(cfg, run_dir)
    return {
        "arm": arm, "seed": seed, "adaptation": summary["adaptation"],
        "forgetting": summary["forgetting"],
        "bytes_up_per_site_round": summary["bytes_up_per_client_round"],
        "domain_loss": summary["domain_loss"], "failures": summary["failures"],
        "wall_s": round(time.monotonic() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="smoke")
    parser.add_argument("--arms", default="fp32,bf16,int8,uniform-8,mixed-4-8-16")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    setup(threads=1)
    runs, load_before = [], load_average()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="fedcpt-upload-ranks-") as tmp:
        for seed in seeds:
            for arm in args.arms.split(","):
                runs.append(measure(args.scenario, arm, seed, Path(tmp)))
                write(args.out, {"benchmark": "upload_ranks", "scenario": args.scenario,
                                 "runs": runs, "cpu_class": cpu_class(),
                                 "load_average": [load_before, load_average()]})


if __name__ == "__main__":
    main()
