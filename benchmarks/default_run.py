"""The goal benchmark of the product: the default run (`shakespeare`: unit-level DP-SGD
at every site, SecAgg+ with simulated signing identities, server-side protection) beside
plain FedAvg as shipped (`shakespeare-fedavg`), in one benchmark, on one held-out split.

Reports each run's adaptation, the three drift measures (KL to the base on the kinds
outside the rehearsal pool, the rise in loss on the base model's own answers, out-of-pool
forgetting), ε per unit, wall and CPU seconds, each of the default run's measures as a
share of plain FedAvg's against the goals (adaptation ≥ 60%, each drift ≤ 20%, ε ≤ 8,
wall time ≤ 10 min with native bf16 or ≤ 20 min in fp32; both runs on the same held-out
blocks), and the CPU class.

    python benchmarks/default_run.py --out results/default_run.json [--fp32] [--keep DIR]

``--fp32`` forces fp32 in both runs (an AVX2 CPU's precision, on a bf16 machine).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import cpu_class, load_average, setup, write

from fedcpt.simulations.default_run import DEFAULT, REFERENCE, default_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", default=REFERENCE)
    parser.add_argument("--default", default=DEFAULT)
    parser.add_argument("--fp32", action="store_true",
                        help="force fp32 (stand in for an AVX2 CPU on a bf16 machine)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="an override for both runs, e.g. federation.rounds=1")
    parser.add_argument("--default-set", action="append", default=[],
                        dest="default_overrides", help="an override of the default run only "
                        "(a trial setting; the JSON records it)")
    parser.add_argument("--tag", default="", help="name the default run's folder "
                        "<default>-<tag> (trials in one --keep folder)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep both run folders here (default: a temporary folder); a "
                        "reference this benchmark finished there is reused")
    args = parser.parse_args()
    setup(threads=1)  # each simulated site runs one torch thread
    overrides = [*args.overrides, *(["model.precision=fp32"] if args.fp32 else [])]
    cpu = cpu_class()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fedcpt-default-run-") as tmp:
        report = default_run(args.keep or Path(tmp), args.reference, args.default, overrides,
                             native_bf16=cpu["native_bf16"] and not args.fp32,
                             default_overrides=args.default_overrides, tag=args.tag)
    write(args.out, {
        "benchmark": "default_run",
        "as_shipped": not args.overrides and not args.default_overrides,
        "overrides": overrides,
        "default_overrides": args.default_overrides,
        **report,
        "cpu_class": cpu,
        "load_average": [load_before, load_average()],
        "note": "CPU shared with other work while measuring: compare cpu_s as well as wall_s",
    })


if __name__ == "__main__":
    main()
