"""End to end: a real Flower simulation (Ray) of the smoke scenario on three local sites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from fedcpt.core.model import byte_tokenizer, tiny_llama

SITES = ("north", "south", "east")
SUMMARY_KEYS = {
    "model", "num_sites", "rounds", "general_loss", "domain_loss", "forgetting", "adaptation",
    "bytes_up_per_client_round", "full_model_bytes", "wall_time_s",
}
# tiny-llama, LoRA r=4 on q_proj (64->64) and v_proj (64->32) in 2 layers, fp32
ADAPTER_NUMEL = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))


pytestmark = pytest.mark.smoke_run("plain")


@pytest.fixture
def sim(smoke_runs):
    """The smoke scenario run once (2 rounds, 3 sites; shared, see tests/conftest.py:
    SMOKE_RUNS): (config, run_dir, summary)."""
    run = smoke_runs["plain"]
    return run.cfg, run.run_dir, run.summary


def test_config_uses_local_sites(sim):
    cfg, _, _ = sim
    assert [s.name for s in cfg.sites] == list(SITES)
    assert cfg.federation.rounds == 2
    assert cfg.model.name == "tiny-llama"


def test_summary_has_required_keys(sim):
    _, run_dir, summary = sim
    on_disk = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert on_disk == summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["model"] == "tiny-llama"
    assert summary["num_sites"] == 3
    assert summary["rounds"] == 2
    assert set(summary["general_loss"]) >= {"base", "final"}
    assert set(summary["domain_loss"]) >= {"base", "final", "per_site"}
    assert set(summary["domain_loss"]["per_site"]) == set(SITES)
    assert summary["forgetting"] == pytest.approx(
        summary["general_loss"]["final"] - summary["general_loss"]["base"])
    assert summary["adaptation"] == pytest.approx(
        summary["domain_loss"]["base"] - summary["domain_loss"]["final"])
    assert summary["bytes_up_per_client_round"] == 4 * ADAPTER_NUMEL
    assert summary["full_model_bytes"] > 10 * summary["bytes_up_per_client_round"]
    assert summary["wall_time_s"] > 0
    assert not (run_dir / "error.txt").exists()


def test_domain_loss_fell(sim):
    _, _, summary = sim
    assert summary["domain_loss"]["final"] < summary["domain_loss"]["base"]
    assert summary["adaptation"] > 0
    for site, losses in summary["domain_loss"]["per_site"].items():
        assert losses["final"] < losses["base"], site


def test_metrics_has_every_round(sim):
    _, run_dir, _ = sim
    rows = [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert sorted(row["sites_trained"]) == sorted(SITES)
        assert set(row["domain_per_site"]) == set(SITES)
        assert row["failures"] == []
        assert row["bytes_up_per_client"] == 4 * ADAPTER_NUMEL


def _load_adapter(path: Path) -> dict[str, torch.Tensor]:
    base = tiny_llama(len(byte_tokenizer()))
    model = PeftModel.from_pretrained(base, str(path))
    return get_peft_model_state_dict(model)


def test_saved_adapters_load_and_changed(sim):
    _, run_dir, _ = sim
    first = _load_adapter(run_dir / "adapters" / "round-000")
    last = _load_adapter(run_dir / "adapters" / "round-002")
    assert set(first) == set(last)
    assert sum(v.numel() for v in last.values()) == ADAPTER_NUMEL
    b_keys = [k for k in first if "lora_B" in k]
    assert b_keys
    assert all(torch.count_nonzero(first[k]) == 0 for k in b_keys)  # B starts at zero
    assert any(torch.count_nonzero(last[k]) > 0 for k in b_keys)
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert all(torch.isfinite(v).all() for v in last.values())


def test_report_and_plots_written(sim):
    _, run_dir, _ = sim
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "general_loss.png" in report and "domain_loss.png" in report
    for png in ("general_loss.png", "domain_loss.png"):
        data = (run_dir / png).read_bytes()
        assert data.startswith(b"\x89PNG"), png
    assert (run_dir / "manifest.json").is_file()


def test_retention_by_kind_and_behaviour_recorded(sim):
    cfg, run_dir, summary = sim
    kinds = [k.name for k in cfg.data.general_kinds()]
    retention = summary["retention"]
    assert list(retention["kinds"]) == kinds == list(summary["general_kinds"])
    pooled = [k for k, v in summary["general_kinds"].items() if v["in_pool"]]
    assert pooled == ["prose", "code"]  # the smoke scenario's stated mix
    assert retention["in_pool"] is not None and retention["out_of_pool"] is not None
    assert retention["overall"]["forgetting"] == pytest.approx(summary["forgetting"])
    behaviour = retention["behaviour"]
    assert behaviour["exact_match_base"] == 1.0  # the base reproduces its own answers
    assert behaviour["kl_to_base"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["general_kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert set(rows[-1]["general_per_kind"]) == set(kinds)
    answers = json.loads((run_dir / "base-answers.json").read_text(encoding="utf-8"))
    assert len(answers) == cfg.data.answer_prompts
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## General retention by kind" in report and "general_kinds.png" in report
    assert (run_dir / "general_kinds.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.smoke_run("plain", "plain-again")
def test_a_seeded_run_without_dp_or_secagg_gives_the_same_adapters_twice(smoke_runs):
    """With a seed and no DP or SecAgg randomness, a simulation is reproducible: two runs of
    `smoke` (seed 0) on one engine save byte-identical adapters every round."""
    first, second = (smoke_runs[name].run_dir / "adapters" for name in ("plain", "plain-again"))
    saved = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert len(saved) == 3  # rounds 0, 1 and 2
    for adapter in saved:
        assert (first / adapter).read_bytes() == (second / adapter).read_bytes(), adapter
