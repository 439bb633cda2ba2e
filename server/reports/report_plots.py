"""The run report's PNG plots (matplotlib, Agg): each writes one file into the run folder
and returns its name, which the report links to."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedcpt.runfolder.paths import RunFolder  # noqa: E402
from fedcpt.runfolder.records import RoundRecord  # noqa: E402

DPI = 110


def _save(fig: Figure, folder: RunFolder, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder.plot(name), dpi=DPI)
    plt.close(fig)
    return name


def plot_general(folder: RunFolder, rows: list[RoundRecord]) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r.round for r in rows], [r.general_loss for r in rows], marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="held-out loss (nats/token)",
           title="General loss (what the model kept; lower is better)")
    ax.grid(alpha=0.3)
    return _save(fig, folder, "general_loss.png")


def plot_domain(folder: RunFolder, rows: list[RoundRecord], base: dict[str, float]) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for site in sorted(base):
        points = [(0, base[site])] + [(r.round, r.domain_per_site[site])
                                      for r in rows if site in r.domain_per_site]
        ax.plot(*zip(*points, strict=True), marker="o", label=site)
    secure = [r for r in rows if r.domain_secure]
    if secure:  # the sites' sum under secure aggregation: one line, no per-site values
        points = [(0, secure[0].domain_secure["base_loss"])] + [
            (r.round, r.domain_secure["loss"]) for r in secure]
        ax.plot(*zip(*points, strict=True), marker="s", linestyle="--",
                label=f"secure sum of {secure[-1].domain_secure['sites']} sites")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="held-out loss (nats/token)",
           title="Domain loss per site (what the model learned)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, "domain_loss.png")


def plot_sites(folder: RunFolder, per_site: dict[str, dict[str, float]]) -> str:
    """Grouped bars per site: held-out domain loss of the base model and the final adapter."""
    sites = sorted(per_site)
    x = range(len(sites))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(sites) + 1.5), 3.5))
    base = ax.bar([i - width / 2 for i in x], [per_site[s]["base"] for s in sites], width,
                  label="base model", color="tab:gray")
    final = ax.bar([i + width / 2 for i in x], [per_site[s]["final"] for s in sites], width,
                   label="final adapter", color="tab:blue")
    ax.bar_label(base, fmt="%.3f", fontsize=7, padding=2)
    ax.bar_label(final, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(list(x), sites)
    # Zoomed to the losses (changes are small next to the loss): the axis does not start at 0.
    values = [v for s in sites for v in (per_site[s]["base"], per_site[s]["final"])]
    span = (max(values) - min(values)) or 0.01
    ax.set_ylim(min(values) - 0.6 * span, max(values) + 0.35 * span)
    ax.set(ylabel="held-out domain loss (nats/token)",
           title="Per site: base vs final (lower is better; axis zoomed)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, folder, "site_loss.png")


def plot_epsilon(folder: RunFolder, curves: dict[str, list[tuple[int, float]]],
                 target: float) -> str:
    """Each site's cumulative ε after each round it paid (``curves``: (round, ε) per site,
    from its ledger), and the budget."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max([target, *(e for points in curves.values() for _, e in points)])
    sites = sorted(curves)
    for i, site in enumerate(sites):
        points = curves[site]
        # shrinking markers: sites with the same spend stay visible on top of each other
        ax.plot(*zip(*points, strict=True), marker="o", markersize=9 - 6 * i / len(sites),
                label=site)
    ax.axhline(target, color="tab:red", linestyle="--", linewidth=1,
               label=f"budget ε = {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="cumulative ε", ylim=(0, top * 1.08),
           title="Privacy spent per site (record-level ε)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, "epsilon.png")


def plot_drift(folder: RunFolder, signals: list[RoundRecord]) -> str:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True)
    rounds = [r.round for r in signals]
    top.plot(rounds, [r.drift["update_ratio"] or float("nan") for r in signals], marker="o")
    top.set(ylabel="update norm ÷ median", title="Drift against the last good rounds")
    bottom.plot(rounds, [float("nan") if r.drift["general_loss_rise"] is None
                         else r.drift["general_loss_rise"] for r in signals], marker="o")
    bottom.set(xlabel="round", ylabel="general loss rise (nats)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        for r in signals:
            if r.drift["flags"]:
                ax.axvline(r.round, color="tab:red", alpha=0.4)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, folder, "drift.png")


def plot_data_drift(folder: RunFolder, per_site: dict[str, float], threshold: float) -> str:
    """One bar per site: its released data drift, the threshold either way, and the sites
    beyond it in red."""
    sites = sorted(per_site)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(sites) + 1.5), 3.2))
    colours = ["tab:red" if threshold and abs(per_site[s]) > threshold else "tab:blue"
               for s in sites]
    bars = ax.bar(sites, [per_site[s] for s in sites], color=colours)
    ax.bar_label(bars, fmt="%+.3f", fontsize=7, padding=2)
    ax.axhline(0, color="grey", linewidth=0.8)
    for level in (threshold, -threshold) if threshold else ():
        ax.axhline(level, color="tab:red", linestyle="--", linewidth=1)
    top = max([threshold, *map(abs, per_site.values())]) * 1.25 or 0.01
    ax.set(ylabel="base loss − previous runs' (nats)", ylim=(-top, top),
           title="Data drift per site")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, folder, "data_drift.png")
