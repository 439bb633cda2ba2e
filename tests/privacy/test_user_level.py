"""Site-level DP (Flower's DP-FedAvg wrapper + client-side clipping) in a real simulation."""

from __future__ import annotations

import json

import pytest

from fedcpt.privacy.accounting import epsilon


@pytest.mark.slow  # a shared smoke run (tests/conftest.py:SMOKE_RUNS, one engine start)
@pytest.mark.smoke_run("user-level")
def test_updates_are_clipped_at_the_site_and_epsilon_reported_separately(smoke_runs):
    clip = 0.01  # far below the unclipped update norm of a smoke round
    run = smoke_runs["user-level"]
    cfg, run_dir, summary = run.cfg, run.run_dir, run.summary
    assert cfg.privacy.user_level and cfg.privacy.user_clipping_norm == clip
    assert cfg.privacy.user_noise_multiplier == 0.5

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    norms = [n for row in rows[1:] for n in row["update_norm_per_site"].values()]
    assert len(norms) == 3 * cfg.federation.rounds
    assert max(norms) <= clip * (1 + 1e-4)

    user = summary["privacy_user_level"]
    assert user["epsilon"] == pytest.approx(
        epsilon([(0.5, 1.0, cfg.federation.rounds)], user["delta"], "rdp"))
    assert "privacy" not in summary  # record-level DP was off: nothing claimed
    assert "Site-level privacy" in (run_dir / "report.md").read_text()
