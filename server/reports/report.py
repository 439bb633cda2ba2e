"""The run report: ``report.md`` with PNG plots beside it, and the same content as one
self-contained page, ``report.html``: what the model learned (domain), what it kept
(general), what changed in words, and what it cost (ε, bytes)."""

from __future__ import annotations

from typing import Any

from fedcpt.config import RunConfig
from fedcpt.core.continuations import Continuation
from fedcpt.privacy.report import STATEMENT, site_table
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import RoundRecord, Summary
from fedcpt.server.reports.report_html import markdown_to_html
from fedcpt.server.reports.report_plots import (
    plot_data_drift,
    plot_domain,
    plot_drift,
    plot_epsilon,
    plot_general,
    plot_sites,
)
from fedcpt.server.reports.retention_report import plot_kinds, retention_lines


def privacy_lines(privacy: dict[str, Any], epsilon_png: str | None = None) -> list[str]:
    lines = ["", "## Privacy", "", STATEMENT, "", f"Each site's ε is {privacy['epsilon_source']}."]
    if privacy["max_epsilon"] is not None:
        lines += ["", f"Federation unit-level ε = **{privacy['max_epsilon']:.3f}** at δ ≤ "
                  f"{privacy['max_delta']:.3g} ({privacy['accountant'].upper()}; budget "
                  f"{privacy['target_epsilon']} per site)."]
    if privacy["sites"]:
        lines += ["", *site_table(privacy["sites"])]
    if privacy["held_by_sites"]:
        lines += ["", "Not read by the server (so no federation maximum): " + "; ".join(
            f"{site}: {why}" for site, why in privacy["held_by_sites"].items()) + "."]
    if epsilon_png:
        lines += ["", "Cumulative ε of each site after each round, from its ledger (every "
                  "earlier run included):", "", f"![ε per round]({epsilon_png})"]
    return lines


# Characters that Markdown (or a table cell) would read as syntax in generated text.
_MARKDOWN_SYNTAX = set("\\`*_[]<>|#~&!")


def _cell(text: str) -> str:
    """Model output as literal text in one table cell (CommonMark backslash escapes)."""
    escaped = "".join(f"\\{ch}" if ch in _MARKDOWN_SYNTAX else ch for ch in text)
    return " ⏎ ".join(escaped.splitlines()).strip() or "(nothing: end of text)"


def continuation_lines(items: list[Continuation], tokens: int) -> list[str]:
    """What changed, in words: each fixed prompt, its base and its final continuation."""
    if not items:
        return []
    lines = ["", "## What changed, in words", "",
             f"Greedy continuations (at most {tokens} new tokens; ⏎ marks a line break) of "
             "the scenario's fixed prompts (`[report]`; written for the scenario, never a "
             "site's data), by the base model and by the final global adapter.", "",
             "| kind | prompt | base model | final adapter |", "|---|---|---|---|"]
    lines += [f"| {c.kind} | {_cell(c.prompt)} | {_cell(c.base)} | {_cell(c.adapted)} |"
              for c in items]
    return lines


SPIKE_NATS = 0.05  # a one-round rise of general loss worth a look
NORM_FACTOR = 3.0  # an update this many times the median earlier norm is flagged


def round_flags(rows: list[RoundRecord]) -> list[list[str]]:
    """Per round: general-loss spikes, outsized site updates, rejected rounds."""
    flags: list[list[str]] = []
    norms: list[float] = []
    last_loss: float | None = None  # of the last evaluated round (federation.eval_every)
    for r in rows:
        f = []
        if r.general_loss is not None:
            if last_loss is not None and r.general_loss - last_loss > SPIKE_NATS:
                f.append(f"general loss +{r.general_loss - last_loss:.3f}")
            last_loss = r.general_loss
        if norms:
            median = sorted(norms)[len(norms) // 2]
            f += [f"{site} update norm {n:.2f}" for site, n in
                  r.update_norm_per_site.items() if n > NORM_FACTOR * median]
        norms += list(r.update_norm_per_site.values())
        if r.rejected_by_guard:
            f.append("rejected by regression guard")
        f += r.drift.get("flags", [])
        f += r.data_drift_flags
        if r.drift.get("rolled_back_to") is not None:
            f.append(f"rolled back to version {r.drift['rolled_back_to']}")
        flags.append(f)
    return flags


def _steps(details: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, d in details.items():
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in d.items())
        parts.append(f"{name}({shown})")
    return "; ".join(parts) or "—"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _threshold(value: float, unit: str) -> str:
    return f"{value:g}{unit}" if value else "off"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def continual_lines(c: dict[str, Any]) -> list[str]:
    """The loss matrix across phases, BWT, FWT and general forgetting per phase."""
    names = [ph["name"] for ph in c["phases"]]
    lines = [
        "", "## Phases (continual stream)", "",
        "| phase | rounds | sites |", "|---|---|---|",
        *[f"| {ph['name']} | {ph['first_round']}–{ph['last_round']} | "
          f"{', '.join(ph['sites'])} |" for ph in c["phases"]],
        "",
        "Held-out domain loss on each phase's sites (columns) after each phase (rows):",
        "",
        "| after ↓ · on → | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| base | " + " | ".join(_fmt(v) for v in c["base_loss"]) + " |",
    ]
    for name, row in zip(names, c["loss_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in row) + " |")
    lines += [
        "",
        f"Backward transfer BWT = **{_signed(c['bwt'])}** nats (mean over earlier phases of "
        "the loss after the last phase − the loss right after that phase; positive = "
        f"forgetting). Forward transfer FWT = **{_signed(c['fwt'])}** nats (mean over later "
        "phases of the loss before they trained − the base loss; negative = earlier phases "
        "helped).",
        "",
        "General forgetting after each phase: " + ", ".join(
            f"{n} {_signed(v)}" for n, v in zip(names, c["general_forgetting"], strict=True))
        + " nats.",
    ]
    return lines


def drift_lines(folder: RunFolder, rows: list[RoundRecord], cfg: RunConfig) -> list[str]:
    """The drift signals per round (plotted, flagged rounds in red) and the rollbacks."""
    signals = [r for r in rows if r.drift]
    if not signals:
        return []
    m = cfg.monitor
    lines = ["", "## Drift", "", f"![drift]({plot_drift(folder, signals)})", "",
             f"Global update norm against the median of the last {m.window} good rounds "
             f"(threshold {_threshold(m.update_drift, '×')}), general loss against their "
             f"lowest (threshold {_threshold(m.general_loss_drift, ' nats')}); action: "
             f"{m.action}.", "",
             "| round | update norm | × median | general loss rise | flagged | rolled back to |",
             "|---|---|---|---|---|---|"]
    for r in signals:
        d = r.drift
        lines.append(f"| {r.round} | {_fmt(r.update_norm, 3)} | {_fmt(d['update_ratio'], 2)} "
                     f"| {_signed(d['general_loss_rise'])} | {'yes' if d['flags'] else '—'} | "
                     f"{'—' if d['rolled_back_to'] is None else d['rolled_back_to']} |")
    return lines


def data_drift_lines(folder: RunFolder, rows: list[RoundRecord], cfg: RunConfig) -> list[str]:
    """Each site's released data drift (its latest value; plotted, flagged sites in red)
    and the flags."""
    latest = {site: v for r in rows for site, v in r.data_drift_per_site.items()}
    if not latest:
        return []
    threshold = cfg.monitor.data_drift_threshold
    flags = [f for r in rows for f in r.data_drift_flags]
    lines = ["", "### Data drift per site", "",
             f"![data drift]({plot_data_drift(folder, latest, threshold)})", "",
             "The base model's held-out loss on each site's data this run minus the mean of "
             "the site's previous runs (same base model and measure), computed and released "
             "by the site under its evaluation policy: a change of the site's data, not of "
             f"the adapter. Threshold {threshold or 'off'} nats either way; a flag only, "
             "never a rollback.", "",
             "| site | data drift (nats) | flagged |", "|---|---|---|"]
    lines += [f"| {site} | {v:+.4f} | {'yes' if threshold and abs(v) > threshold else '—'} |"
              for site, v in sorted(latest.items())]
    if flags:
        lines += ["", *[f"- {f.removeprefix('data drift: ')}" for f in flags]]
    return lines


def _retention(folder: RunFolder, s: Summary, rows: list[RoundRecord]) -> list[str]:
    """The retention section and its plot (general loss by kind, KL to the base)."""
    if not s.retention or not rows or not rows[0].general_per_kind:
        return []
    plot_kinds(folder.plot("general_kinds.png"), [r.round for r in rows],
               [r.general_per_kind for r in rows], [r.general_kl_to_base for r in rows])
    return [*retention_lines(s.retention, s.general_kinds or {}), "",
            "![general loss by kind and KL to the base](general_kinds.png)"]


def _domain_tokens(s: Summary) -> str:
    """How many held-out tokens the domain loss is measured on (per site, or summed)."""
    if "secure_sum" in s.domain_loss:
        sec = s.domain_loss["secure_sum"]
        return (f"{sec['tokens']} held-out tokens summed over {sec['sites']} sites under "
                "secure aggregation")
    return f"{s.eval_tokens['domain_per_site']} held-out tokens per site"


def _evaluated_rounds(rows: list[RoundRecord], cfg: RunConfig) -> list[str]:
    """Which rounds were evaluated, when ``federation.eval_every`` skipped some."""
    if all(r.evaluated for r in rows):
        return []
    done = ", ".join(str(r.round) for r in rows if r.evaluated)
    return [f"Evaluated rounds: {done} (`federation.eval_every = "
            f"{cfg.federation.eval_every}`; round 0, each phase's last round and the run's "
            "last are always evaluated). The others trained and were saved but not "
            "evaluated (— below).", ""]


def write_report(folder: RunFolder, summary: Summary, rows: list[RoundRecord],
                 domain_base: dict[str, float], cfg: RunConfig,
                 continuations: list[Continuation] | None = None,
                 *, mechanism: list[str], upload_form: str) -> None:
    """Render the run's report as Markdown beside its plots, and as one HTML page, with
    the round protocol's ``mechanism`` section and ``upload_form`` (how an update
    travels; :class:`~fedcpt.server.protocols.base.RoundProtocol`)."""
    evaluated = [r for r in rows if r.evaluated]
    general_png = plot_general(folder, evaluated)
    domain_png = plot_domain(folder, rows, domain_base)
    s = summary
    lines = [
        f"# fedcpt run `{s.name}`",
        "",
        f"Model **{s.model}**, {s.num_sites} sites, {s.rounds} rounds, "
        f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}, "
        f"{cfg.train.local_steps} local steps × {cfg.train.batch_size} × "
        f"{cfg.data.block_size} tokens at LR {cfg.train.lr:g} ({cfg.train.schedule}).",
        "",
        "## Result",
        "",
        "| | base | final | change |",
        "|---|---|---|---|",
        f"| general loss (kept) | {_fmt(s.general_loss['base'])} | "
        f"{_fmt(s.general_loss['final'])} | forgetting {s.forgetting:+.4f} "
        f"(± {s.forgetting_standard_error:.4f} s.e.) |",
        f"| domain loss (learned) | {_fmt(s.domain_loss['base'])} | "
        f"{_fmt(s.domain_loss['final'])} | adaptation {_fmt(s.adaptation)} |",
        "",
        "Forgetting = general loss − base general loss (positive: the model lost general "
        "skill). Adaptation = base domain loss − domain loss (positive: it learned the "
        f"domain). General loss is measured on {s.eval_tokens['general']} held-out "
        "tokens of the server's general text "
        f"({', '.join(k.name for k in cfg.data.general_kinds())}) that no training ever "
        "sees; "
        f"domain loss on {_domain_tokens(s)}.",
        "",
        f"![general loss]({general_png})",
        f"![domain loss]({domain_png})",
        *_retention(folder, s, evaluated),
        *continuation_lines(continuations or [], cfg.report.continuation_tokens),
        "",
        "## Per site",
        "",
        "| site | base domain loss | final domain loss | change |",
        "|---|---|---|---|",
    ]
    for site, v in sorted(s.domain_loss["per_site"].items()):
        lines.append(f"| {site} | {v['base']:.4f} | {v['final']:.4f} | "
                     f"{v['final'] - v['base']:+.4f} |")
    if s.domain_loss["per_site"]:
        lines += ["", f"![per-site domain loss]({plot_sites(folder, s.domain_loss['per_site'])})"]
    if "secure_sum" in s.domain_loss:
        sec = s.domain_loss["secure_sum"]
        lines += ["", f"Under secure aggregation the server learned only the sum of "
                  f"{sec['sites']} sites' evaluations, never one site's: as a token-weighted "
                  f"mean over {sec['tokens']} tokens, base {sec['base']:.4f}, final "
                  f"{sec['final']:.4f} ({sec['final'] - sec['base']:+.4f}). Those sites have "
                  "no row above."]
    lines += ["", "## Rounds", "", *_evaluated_rounds(rows, cfg)]
    lines += [
        "| round | general loss | domain loss | train loss | sites | failures | server steps "
        "| flags | elapsed s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, flags in zip(rows, round_flags(rows), strict=True):
        lines.append(
            f"| {r.round} | {_fmt(r.general_loss) if r.evaluated else '—'} | "
            f"{_fmt(r.domain_loss) if r.evaluated else '—'} | "
            f"{_fmt(r.train_loss)} | {len(r.sites_trained)} | {len(r.failures)} | "
            f"{_steps(r.server_steps)} | {', '.join(flags) or '—'} | {r.elapsed_s:.0f} |")
    lines += drift_lines(folder, rows, cfg)
    data_drift = data_drift_lines(folder, rows, cfg)
    if data_drift and not any(r.drift for r in rows):
        lines += ["", "## Drift"]
    lines += data_drift
    if s.continual is not None:
        lines += continual_lines(s.continual)
    failures = [f for r in rows for f in r.failures]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    if s.privacy is not None:
        curves = {site: v["epsilon_by_round"] for site, v in s.privacy["sites"].items()
                  if v["epsilon_by_round"]}
        lines += privacy_lines(s.privacy, plot_epsilon(folder, curves, s.privacy["target_epsilon"])
                               if curves else None)
    lines += mechanism
    lines += [
        "",
        "## Communication",
        "",
        f"A site uploads {s.bytes_up_per_client_round:,} bytes of adapter tensors per "
        f"round (the mean over sites; {upload_form}), "
        f"{100 * (s.upload_fraction or 0):.3f}% of the full model "
        f"({s.full_model_bytes:,} bytes). Wall time {s.wall_time_s:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    folder.report.write_text(text, encoding="utf-8")
    folder.report_html.write_text(markdown_to_html(text, folder, f"fedcpt run {s.name}"),
                                  encoding="utf-8")

