"""The run report a person opens: report.html (one page, plots inline), ε per round and
per-site bars, and what changed in words from the scenario's fixed prompts only."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from fedcpt.config import ReportConfig
from fedcpt.core.continuations import Continuation, continuations
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder
from fedcpt.server.reports.report import continuation_lines
from fedcpt.server.reports.report_html import markdown_to_html
from fedcpt.server.reports.site_ledgers import FROM_LEDGERS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
@pytest.mark.smoke_run("dp")
def test_report_html_is_one_page_with_every_plot_inline(smoke_dp_run):
    _, run_dir, _ = smoke_dp_run
    folder = RunFolder(run_dir)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", folder.report.read_text(encoding="utf-8"))
    # the new plots: ε per round (DP is on) and the per-site bars
    assert {"general_loss.png", "domain_loss.png", "epsilon.png", "site_loss.png"} <= set(linked)
    page = folder.report_html.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<script" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(linked)  # every plot, and none left pointing at a file
    for src, name in zip(sources, linked, strict=True):
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png.startswith(PNG_MAGIC) and png == folder.plot(name).read_bytes()
    assert "<h2>What changed, in words</h2>" in page and "<table>" in page


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
@pytest.mark.smoke_run("dp")
def test_continuations_are_the_config_prompts_only(smoke_dp_run):
    cfg, run_dir, _ = smoke_dp_run
    assert cfg.report.prompts  # the smoke scenario sets a general and a domain prompt
    saved = json.loads(RunFolder(run_dir).continuations.read_text(encoding="utf-8"))
    assert [(c["kind"], c["prompt"]) for c in saved] == cfg.report.prompts
    site_text = "".join(open(path, encoding="utf-8").read()
                        for site in cfg.sites for path in site.data)
    assert not any(prompt in site_text for _, prompt in cfg.report.prompts)
    page = RunFolder(run_dir).report_html.read_text(encoding="utf-8")
    for _, prompt in cfg.report.prompts:
        assert prompt in page


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
@pytest.mark.smoke_run("dp")
def test_epsilon_per_round_is_read_from_the_site_ledgers(smoke_dp_run):
    cfg, run_dir, summary = smoke_dp_run
    assert summary["privacy"]["epsilon_source"] == FROM_LEDGERS
    for final in summary["privacy"]["sites"].values():
        rounds, curve = zip(*final["epsilon_by_round"], strict=True)
        assert list(rounds) == list(range(1, cfg.federation.rounds + 1))
        assert list(curve) == sorted(curve) and curve[0] > 0  # cumulative: never falls
        assert curve[-1] == pytest.approx(final["epsilon"])
    report = RunFolder(run_dir).report.read_text(encoding="utf-8")
    assert "read from the sites' own ledger files" in report and "epsilon.png" in report


def test_base_continuation_ignores_the_adapter_and_is_deterministic(fresh_lm):
    prompts = [("general", "The weather today is"), ("domain", "Hark, my good lord")]
    before = continuations(fresh_lm, prompts, 10)
    # LoRA B starts at zero: the adapted model is the base model
    assert all(c.base == c.adapted for c in before)
    with torch.no_grad():
        for name, param in fresh_lm.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param, generator=torch.Generator().manual_seed(0)))
    after = continuations(fresh_lm, prompts, 10)
    assert [c.base for c in after] == [c.base for c in before]  # adapter disabled
    assert any(c.adapted != c.base for c in after)
    assert continuations(fresh_lm, prompts, 10) == after  # greedy: the same every time
    assert [(c.kind, c.prompt) for c in after] == prompts


def test_model_output_stays_literal_text_in_both_reports(tmp_path):
    hostile = Continuation("domain", "Hark", "<script>alert(1)</script> | *x*",
                           "line one\nline two [link](http://x) | end")
    markdown = "\n".join(continuation_lines([hostile], 12))
    page = markdown_to_html(markdown, RunFolder(tmp_path), "t")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<a href" not in page and "<em>" not in page
    row = re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)[1]
    assert row.count("<td>") == 4  # a | in the output does not split the cell
    assert "line one ⏎ line two" in row


@pytest.mark.parametrize(("settings", "match"), [
    ({"continuation_tokens": 0}, r"`report.continuation_tokens` must be in 1..256, got 0"),
    ({"domain_prompts": ("",)}, r"`report.domain_prompts` must be non-empty strings"),
    ({"general_prompts": ("a",) * 9}, r"`report.general_prompts` must be at most 8 prompts"),
])
def test_bad_report_settings_fail_cleanly(settings, match):
    with pytest.raises(ConfigError, match=match):
        ReportConfig(**settings)
