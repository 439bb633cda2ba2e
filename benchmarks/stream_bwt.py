"""The stream goal of issue 26 item 4: on `shakespeare-stream`, a protection removes ≥ 80%
of plain FedAvg's backward transfer (BWT) and keeps ≥ 90% of each phase's adaptation.

Plain FedAvg runs first; each arm then runs from its split records, so every run holds
out the same units. Each arm is reported against that reference: the share of its BWT
removed and, for every phase, the share of its own adaptation (the base's loss on the
phase's sites less the loss after the phase's last round) kept. ``--dp`` runs the
reference and every arm at ε = 8 per passage with the default run's DP-SGD settings.

    python benchmarks/stream_bwt.py --keep DIR --out results/stream_bwt.json \
        --arm phase-anchor=strategy.anchor=phase [--arm NAME=K=V,K=V ...] [--dp]

A reference or arm this benchmark finished in ``--keep`` before, with the same overrides,
is reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import cpu_class, load_average, setup, write

from fedcpt.privacy.heldout import share_splits
from fedcpt.simulations.compare import share, share_removed
from fedcpt.simulations.default_run import reference_run

SCENARIO = "shakespeare-stream"
BWT_REMOVED_GOAL = 0.8
ADAPTATION_KEPT_GOAL = 0.9
# The default run's DP-SGD (simulations/shakespeare.toml and shakespeare-dp.toml): ε = 8 per
# passage, FFA-LoRA rank 1 on q/v, C = 0.1, 32 units a step, 3 steps a round at 2e-2.
DP_SETTINGS = ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.max_grad_norm=0.1",
               "privacy.ffa_lora=true", "lora.r=1", "lora.alpha=6", "train.batch_size=32",
               "train.max_physical_batch_size=8", "train.local_steps=3", "train.lr=0.02"]


def stream_measures(run_dir: Path) -> dict[str, Any]:
    """BWT and each phase's own adaptation from a finished run's summary."""
    summary = json.loads((run_dir / "summary.json").read_text())
    continual = summary["continual"]
    return {"bwt": continual["bwt"], "fwt": continual["fwt"],
            "phase_adaptation": continual["phase_adaptation"],
            "general_forgetting": continual["general_forgetting"],
            "loss_matrix": continual["loss_matrix"], "base_loss": continual["base_loss"],
            "epsilon": (summary.get("privacy") or {}).get("max_epsilon"),
            "wall_time_s": summary.get("wall_time_s")}


def against(reference: dict[str, Any], arm: dict[str, Any]) -> dict[str, Any]:
    """The arm's share of the reference's BWT removed and of each phase's adaptation kept,
    and whether both goals are met."""
    removed = share_removed(reference["bwt"], arm["bwt"])
    kept = [share(a, r) for a, r in zip(arm["phase_adaptation"],
                                         reference["phase_adaptation"], strict=True)]
    return {"bwt_removed": removed, "phase_adaptation_kept": kept,
            "goals_met": removed is not None and removed >= BWT_REMOVED_GOAL
            and all(k is not None and k >= ADAPTATION_KEPT_GOAL for k in kept)}


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise SystemExit(f"--arm {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, overrides.split(",")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", type=Path, required=True,
                        help="the run folders; finished runs there are reused")
    parser.add_argument("--arm", action="append", default=[], type=parse_arm,
                        help="NAME=KEY=VALUE[,KEY=VALUE...]: an arm's overrides (values "
                        "without commas)")
    parser.add_argument("--dp", action="store_true",
                        help="every run at ε = 8 with the default run's DP-SGD settings")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="an override of every run")
    args = parser.parse_args()
    setup(threads=1)
    common = [*(DP_SETTINGS if args.dp else ["privacy.enabled=false"]), *args.overrides]
    cpu, load_before = cpu_class(), load_average()

    def folder(name: str) -> Path:
        return args.keep / (f"{name}-dp" if args.dp else name)

    def ledgers(name: str) -> Path:
        return (folder(name) / "ledgers").resolve()

    plain = (args.keep / "fedavg" / "ledgers").resolve()
    if args.dp and plain.is_dir():  # one held-out split across the DP and non-DP runs
        share_splits(plain, ledgers("fedavg"))
    reference_run(SCENARIO, folder("fedavg"),
                  [*common, f"privacy.ledger_dir={ledgers('fedavg')}"])
    reference = stream_measures(folder("fedavg"))
    arms = []
    for name, overrides in args.arm:
        share_splits(ledgers("fedavg"), ledgers(name))
        reference_run(SCENARIO, folder(name),
                      [*common, *overrides, f"privacy.ledger_dir={ledgers(name)}"])
        got = stream_measures(folder(name))
        arms.append({"arm": name, "overrides": overrides, **got, **against(reference, got)})
    write(args.out, {
        "benchmark": "stream_bwt", "scenario": SCENARIO, "dp": args.dp,
        "common_overrides": common,
        "goals": {"bwt_removed": BWT_REMOVED_GOAL,
                  "phase_adaptation_kept": ADAPTATION_KEPT_GOAL},
        "reference": {"arm": "fedavg", **reference}, "arms": arms,
        "cpu_class": cpu, "load_average": [load_before, load_average()],
    })


if __name__ == "__main__":
    main()
