"""Withdrawing a site on the scenario's model: ``fedcpt adapters forget RUN SITE`` against a
federation that never had the site, side by side.

1. The run: the scenario itself (or ``--run``, a finished run folder of it).
2. ``fedcpt adapters forget RUN SITE``: the replay without SITE and its certificate.
3. The never-joined federation: ``fedcpt simulate`` of the same scenario without SITE.
4. SITE's own held-out domain loss (the blocks it evaluates in federation, with the split
   it uses) under the base model, the run's final version, the replay's final version and
   the never-joined run's final version; the goal is replay = never-joined within noise,
   both well above the run's (the site's data is no longer in the model).

Reports each step's wall time (the forget's cost in time) and, under DP, the other sites'
ε before and after the replay (its cost in ε, from the removal certificate).

    python benchmarks/forget.py --out results/forget.json [--run RUN] [--site comedies]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_class, load_average, write

from fedcpt.client.site import policy_for, site_blocks
from fedcpt.core.adapters import adapter_state, load_adapter, load_version, to_arrays
from fedcpt.core.evaluation import evaluate_blocks, paired_standard_error
from fedcpt.core.model import load_adapted_model
from fedcpt.runfolder.versions import list_versions, run_config, version_dir
from fedcpt.tools.forget import CERTIFICATE


def fedcpt(*args: str) -> float:
    """Run the fedcpt CLI; seconds it took (exits with its stderr if it failed)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedcpt.cli", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fedcpt {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def final_version(run_dir: Path) -> Path:
    return version_dir(run_dir, max(v["round"] for v in list_versions(run_dir)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="shakespeare-fedavg")
    parser.add_argument("--run", type=Path, help="a finished run of the scenario")
    parser.add_argument("--site", default="comedies")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: temporary)")
    args = parser.parse_args()
    load_before = load_average()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedcpt-forget-"))
    seconds: dict[str, float] = {}
    run = args.run
    if run is None:
        run = work / "run"
        seconds["run"] = fedcpt("simulate", args.scenario, "--out", str(run))
    cfg = run_config(run)
    others = [s for s in cfg.sites if s.name != args.site]
    if len(others) == len(cfg.sites):
        raise SystemExit(f"{args.site!r} is not a site of {run}")

    replay = work / "replay"
    seconds["forget"] = fedcpt("adapters", "forget", str(run), args.site, "--out", str(replay))
    sites = work / "sites-without.toml"
    sites.write_text("".join(f'[[sites]]\nname = "{s.name}"\ndata = {json.dumps(list(s.data))}'
                             "\n\n" for s in others))
    never = work / "never-joined"
    seconds["never_joined"] = fedcpt("simulate", args.scenario, "--config", str(sites),
                                     "--out", str(never))

    withdrawn = next(s for s in cfg.sites if s.name == args.site)
    blocks = site_blocks(withdrawn, cfg.model, cfg.data, policy_for(cfg, withdrawn, {}))
    heldout = blocks.heldout[:cfg.data.heldout_blocks]
    lm = load_adapted_model(cfg.model, cfg.lora, cfg.seed)
    reference = to_arrays(adapter_state(lm.model))
    results = {"base": evaluate_blocks(lm, heldout, cfg.train.eval_batch_size)}
    for name, folder in (("with_site", run), ("after_forget", replay),
                         ("never_joined", never)):
        load_adapter(lm.model, load_version(final_version(folder), reference))
        results[name] = evaluate_blocks(lm, heldout, cfg.train.eval_batch_size)
    after, never_result = results["after_forget"], results["never_joined"]
    certificate = json.loads((replay / CERTIFICATE).read_text())
    write(args.out, {
        "benchmark": "forget",
        "scenario": args.scenario,
        "model": cfg.model.name,
        "site": args.site,
        "heldout_blocks": len(heldout),
        "domain_loss": {k: r.loss for k, r in results.items()},
        "after_forget_minus_never_joined": after.loss - never_result.loss,
        "paired_standard_error": paired_standard_error(never_result.block_losses,
                                                       after.block_losses),
        "max_block_difference": max(abs(a - b) for a, b in
                                    zip(after.block_losses, never_result.block_losses,
                                        strict=True)),
        "seconds": seconds,
        "privacy_cost": certificate["privacy"],
        "certificate": {k: certificate[k] for k in (
            "versions_affected", "replayed_from", "replayed_rounds", "replacement",
            "equals_never_joined", "caveats")},
        "cpu": cpu_class(),
        "load_average": [load_before, load_average()],
        "runs": {"run": str(run), "replay": str(replay), "never_joined": str(never)},
    })


if __name__ == "__main__":
    main()
