"""Site-level DP (Flower's DP-FedAvg wrapper + client-side clipping) in a real simulation."""

from __future__ import annotations

import json

import pytest

from fedcpt.config import load_config
from fedcpt.privacy.accounting import epsilon
from fedcpt.simulations.runner import simulate


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
def test_updates_are_clipped_at_the_site_and_epsilon_reported_separately(tmp_path,
                                                                          sites_config):
    clip = 0.01  # far below the unclipped update norm of a smoke round
    cfg = load_config("smoke", config_file=sites_config, overrides=[
        "privacy.user_level=true", f"privacy.user_clipping_norm={clip}",
        "privacy.user_noise_multiplier=0.5"])
    run_dir = tmp_path / "run"
    summary = simulate(cfg, run_dir)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    norms = [n for row in rows[1:] for n in row["update_norm_per_site"].values()]
    assert len(norms) == 3 * cfg.federation.rounds
    assert max(norms) <= clip * (1 + 1e-4)

    user = summary["privacy_user_level"]
    assert user["epsilon"] == pytest.approx(
        epsilon([(0.5, 1.0, cfg.federation.rounds)], user["delta"], "rdp"))
    assert "privacy" not in summary  # record-level DP was off: nothing claimed
    assert "Site-level privacy" in (run_dir / "report.md").read_text()
