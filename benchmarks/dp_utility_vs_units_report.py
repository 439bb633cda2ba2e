"""The table and plot of docs/privacy.md from ``results/dp_utility_vs_units.json``.

    python benchmarks/dp_utility_vs_units_report.py \\
        --result benchmarks/results/dp_utility_vs_units.json \\
        --png docs/results/dp-utility-vs-units.png

prints the markdown table (``tests/privacy/test_expected_utility.py`` checks that the
docs carry it as printed) and writes the plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def markdown_table(result: dict) -> str:
    """One row per site size: DP-off adaptation, then each ε's adaptation, kept share and σ."""
    points = result["points"]
    budgets = sorted({p["epsilon"] for p in points if p["epsilon"] is not None})
    head = ["N units", "DP off"] + [f"ε = {e:g}" for e in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sorted({p["units"] for p in points}):
        row = {p["epsilon"]: p for p in points if p["units"] == n}
        off = row.get(None)
        cells = [f"{n:,}", f"{off['adaptation']:+.4f}" if off else "not run"]
        for e in budgets:
            p = row.get(e)
            if p is None:
                cells.append("not run")
                continue
            kept = f"**{100 * p['adaptation'] / off['adaptation']:.0f}%**, " if off else ""
            cells.append(f"{kept}{p['adaptation']:+.4f} (σ {p['noise_multiplier']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Kept share against N (log scale), one line per ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    kept = result["kept"]
    budgets = sorted({float(e) for row in kept.values() for e in row})
    for eps in budgets:
        sizes = sorted(int(n) for n, row in kept.items() if str(eps) in row)
        ax.plot(sizes, [100 * kept[str(n)][str(eps)] for n in sizes], marker="o",
                label=f"ε = {eps:g}")
    ax.axhline(100, color="grey", linestyle="--", label="DP off (same compute)")
    ax.set_xscale("log")
    ax.set_xlabel("privacy units N at the site")
    ax.set_ylabel("share of DP-off adaptation kept (%)")
    ax.set_title(f"{result['model']} on {result['corpus']}: {result['steps']} steps × "
                 f"{result['expected_batch']} units × {result['block_size']} tokens",
                 fontsize=9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    plot(result, args.png)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
