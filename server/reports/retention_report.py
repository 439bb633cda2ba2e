"""The report's retention section and plot: forgetting per kind of general text, in and
out of the rehearsal pool, and behaviour kept (KL to the base, the base's own answers).

Reads the JSON forms written to ``summary.json`` (``retention``, ``general_kinds``) and the
per-round series of ``metrics.jsonl``, so it needs nothing but the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

JUDGED_BY = (
    "Strategies are judged by behaviour kept (KL to the base model and loss on the base "
    "model's own answers) and by forgetting on the kinds outside the rehearsal pool. "
    "Raw-text loss on the pool's own kinds can fall below the base model's by recalibrating "
    "an instruct model toward raw-text continuation, which shows nothing about what it "
    "kept; KL cannot go below zero, and the base answers are what a user who chats with "
    "the model sees.")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def _forgetting(f: dict[str, Any] | None) -> str:
    if f is None:
        return "—"
    return f"{f['forgetting']:+.4f} ± {f['standard_error']:.4f}"


def retention_lines(retention: dict[str, Any], kinds: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: a table of kinds and groups, then behaviour, then what judges a strategy.

    ``kinds``: per kind, ``in_pool`` and ``sources`` (the summary's ``general_kinds``)."""
    lines = ["", "## General retention by kind", "",
             "| kind | in rehearsal pool | sources | base loss | final loss | forgetting ± SE "
             "| KL to base | ECE base → final |",
             "|---|---|---|---|---|---|---|---|"]
    for name, f in retention["kinds"].items():
        info = kinds.get(name, {})
        ece = retention["eces"][name]
        lines.append(
            f"| {name} | {'yes' if info.get('in_pool') else 'no'} | "
            f"{', '.join(info.get('sources', []))} | {f['base_loss']:.4f} | {f['loss']:.4f} | "
            f"{_forgetting(f)} | {_fmt(f['kl_to_base'])} | {ece[0]:.4f} → {ece[1]:.4f} |")
    for label, key in (("in the pool", "in_pool"), ("outside the pool", "out_of_pool"),
                       ("all kinds", "overall")):
        f = retention[key]
        if f is not None:
            lines.append(f"| **{label}** | | | {f['base_loss']:.4f} | {f['loss']:.4f} | "
                         f"**{_forgetting(f)}** | {_fmt(f['kl_to_base'])} | |")
    b = retention["behaviour"]
    lines += ["", "**Behaviour kept.** "
              f"KL(base ‖ final) on the general text: {_fmt(b['kl_to_base'])} nats per token."]
    if b["answer_loss"] is not None:
        lines[-1] += (
            f" On the base model's own greedy answers to the built-in prompts: loss "
            f"{b['answer_loss_base']:.4f} → {b['answer_loss']:.4f} "
            f"({b['answer_loss_increase']:+.4f}), greedy exact match "
            f"{100 * b['exact_match_base']:.0f}% → {100 * b['exact_match']:.0f}%, "
            f"token agreement {100 * b['token_agreement']:.1f}%.")
    lines += ["", JUDGED_BY]
    return lines


def plot_kinds(path: Path, rounds: list[int], per_kind: list[dict[str, float]],
               kl: list[float | None]) -> None:
    """Forgetting per kind (loss − round-0 loss) and KL to the base, by round."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in per_kind[0]:
        base = per_kind[0][name]
        left.plot(rounds, [r[name] - base for r in per_kind], marker="o", label=name)
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set(xlabel="round", ylabel="forgetting (nats)", title="General loss change by kind")
    left.legend(fontsize=8)
    points = [(r, k) for r, k in zip(rounds, kl, strict=True) if k is not None]
    right.plot([r for r, _ in points], [k for _, k in points], marker="o", color="C3")
    right.set(xlabel="round", ylabel="nats per token", title="KL(base ‖ adapted)")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
