"""`fedcpt compare`: every arm is a real run, measured against plain FedAvg."""

from __future__ import annotations

import json

import pytest

from fedcpt.exceptions import ConfigError
from fedcpt.simulations.compare import ARMS, compare, grid


def test_grid_always_includes_the_fedavg_reference():
    arms = grid(["rehearsal-mix"], [False, True])
    assert [(a.name, a.dp) for a in arms] == [
        ("fedavg", False), ("rehearsal-mix", False), ("fedavg", True), ("rehearsal-mix", True)]
    assert "privacy.enabled=true" in arms[-1].overrides


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_is_a_valid_configuration(arm):
    from fedcpt.config import load_config

    cfg = load_config("smoke", overrides=ARMS[arm])
    if "distill" in arm:
        assert cfg.strategy.distillation == "both"


def test_unknown_arm_is_rejected_before_anything_runs():
    with pytest.raises(ConfigError, match="unknown arms"):
        grid(["ewc-typo"], [False])


def test_compare_writes_arms_against_the_reference(tmp_path, sites_config):
    config = sites_config
    out = tmp_path / "cmp"
    payload = compare("smoke", out, ["rehearsal-finetune"], [False], [], config_file=config)
    saved = json.loads((out / "compare.json").read_text())
    assert saved == payload
    arms = {r["arm"]: r for r in saved["arms"]}
    assert set(arms) == {"fedavg", "rehearsal-finetune"}
    ref = arms["fedavg"]
    for row in arms.values():
        assert row["dp"] is False and row["epsilon"] is None
        assert row["reference"] == {"forgetting": ref["forgetting"],
                                    "adaptation": ref["adaptation"]}
        assert (out / row["arm"] / "summary.json").is_file()
    assert arms["fedavg"]["adaptation_kept"] == pytest.approx(1.0)
    assert (out / "pareto.png").is_file() and (out / "compare.md").is_file()


def test_removed_is_the_share_of_the_reference_damage():
    from fedcpt.simulations.compare import retention_measures, share_removed

    assert share_removed(0.2, 0.05) == pytest.approx(0.75)
    assert share_removed(0.2, -0.1) == pytest.approx(1.5)  # past the base
    assert share_removed(-0.1, 0.0) is None and share_removed(None, 0.1) is None
    summary = {"retention": {"in_pool": {"forgetting": 0.1}, "out_of_pool": None,
                             "behaviour": {"kl_to_base": 0.3, "answer_loss_increase": 0.2}}}
    assert retention_measures(summary) == {"in_pool_forgetting": 0.1,
                                           "out_of_pool_forgetting": None,
                                           "kl_to_base": 0.3, "answer_loss_increase": 0.2}
