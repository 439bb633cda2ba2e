"""DP that still learns: the default scenario as shipped (plain FedAvg, its own settings)
and `shakespeare-dp` (unit-level DP-SGD, ε = 8 per unit) side by side, on SmolLM2-135M.

Reports each run's adaptation (base − final domain loss) and forgetting (general loss
change), adaptation kept = DP / non-DP, the wall-time ratio DP / non-DP, ε and δ spent
per unit at each site, every setting that ran, and the CPU class. Goal on a 2-core CPU:
kept ≥ 0.6 at ε = 8 with wall time ≤ 3×.

    python benchmarks/dp_utility.py --out results/dp_utility.json [--rounds N]

``--rounds`` shortens *both* runs alike (the DP noise is then planned for the shorter
run's whole budget); the JSON records it, and without it both run as shipped.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import cpu_class, load_average, setup, write

from fedcpt.simulations.dp_utility import dp_utility


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference", default="shakespeare-fedavg")
    parser.add_argument("--dp", default="shakespeare-dp")
    parser.add_argument("--rounds", type=int, default=0,
                        help="run both scenarios for this many rounds (0: as shipped)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep both run folders here (default: a temporary folder)")
    args = parser.parse_args()
    setup(threads=1)  # each simulated site runs one torch thread in its Ray worker
    overrides = [f"federation.rounds={args.rounds}"] if args.rounds else []
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fedcpt-dp-utility-") as tmp:
        folder = args.keep or Path(tmp)
        report = dp_utility(folder, args.reference, args.dp, overrides)
    write(args.out, {
        "benchmark": "dp_utility",
        "as_shipped": not overrides,
        "overrides": overrides,
        **report,
        "cpu_class": cpu_class(),
        "load_average": [load_before, load_average()],
    })


if __name__ == "__main__":
    main()
