"""`fedcpt compare`: every arm is a real run, measured against plain FedAvg."""

from __future__ import annotations

import json
from pathlib import Path

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

    cfg = load_config("smoke-stream" if arm.startswith("phase") else "smoke",
                      overrides=ARMS[arm])
    if "distill" in arm:
        assert cfg.strategy.distillation in ("both", "pool")


def test_unknown_arm_is_rejected_before_anything_runs():
    with pytest.raises(ConfigError, match="unknown arms"):
        grid(["ewc-typo"], [False])


@pytest.mark.slow  # a real simulation: minutes on 2 cores (the slow tier)
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
    # every arm's sites held out the same units (one salt), so both were measured on the
    # same blocks: the base model's loss on them is the same number
    bases = [{site: v["base"] for site, v in json.loads(
        (out / arm / "summary.json").read_text())["domain_loss"]["per_site"].items()}
        for arm in arms]
    assert bases[0] == bases[1] and len(bases[0]) == 3


def test_removed_is_the_share_of_the_reference_damage():
    from fedcpt.simulations.compare import retention_measures, share_removed

    assert share_removed(0.2, 0.05) == pytest.approx(0.75)
    assert share_removed(0.2, -0.1) == pytest.approx(1.5)  # past the base
    assert share_removed(-0.1, 0.0) is None and share_removed(None, 0.1) is None
    from fedcpt.simulations.compare import share

    assert share(0.3, 0.5) == pytest.approx(0.6)
    assert share(-0.2, -0.1) is None and share(0.1, 0.0) is None  # nothing gained to keep
    summary = {"retention": {"in_pool": {"forgetting": 0.1}, "out_of_pool": None,
                             "behaviour": {"kl_to_base": 0.3, "answer_loss_increase": 0.2}}}
    assert retention_measures(summary) == {"in_pool_forgetting": 0.1,
                                           "out_of_pool_forgetting": None,
                                           "kl_to_base": 0.3, "answer_loss_increase": 0.2}


def _summary(forgetting: float, adaptation: float, bwt: float | None,
             phases: list[float] | None = None) -> dict:
    kinds = {"in_pool": {"forgetting": forgetting}, "out_of_pool": {"forgetting": forgetting},
             "behaviour": {"kl_to_base": 0.1, "answer_loss_increase": 0.1}}
    return {"forgetting": forgetting, "adaptation": adaptation, "retention": kinds,
            "continual": None if bwt is None else {"bwt": bwt, "phase_adaptation": phases}}


@pytest.mark.parametrize("stream", [True, False])
def test_a_streams_backward_transfer_is_compared_against_fedavgs(tmp_path, stream):
    from fedcpt.simulations.compare import _table, against_reference, arm_row

    fedavg, mix = grid(["rehearsal-mix"], [False])
    rows = [arm_row(fedavg, _summary(0.1, 0.5, 0.2 if stream else None, [0.4, 0.5]),
                    tmp_path / "a"),
            arm_row(mix, _summary(0.0, 0.45, 0.05 if stream else None, [0.38, 0.25]),
                    tmp_path / "b")]
    against_reference(rows)
    assert rows[1]["adaptation_kept"] == pytest.approx(0.9)
    assert rows[1]["forgetting_removed"] == pytest.approx(1.0)
    _table(rows, tmp_path / "compare.md")
    table = (tmp_path / "compare.md").read_text()
    if stream:
        assert rows[1]["bwt_removed"] == pytest.approx(0.75)
        assert rows[1]["phase_adaptation_kept"] == pytest.approx([0.95, 0.5])
        assert "| rehearsal-mix | off | +0.0500 | 75% | 95%, 50% |" in table
    else:
        assert rows[1]["bwt"] is None and rows[1]["bwt_removed"] is None
        assert "BWT" not in table


def test_dp_arms_run_at_every_budget_of_the_frontier():
    arms = grid(["fedavg"], [False, True], (1.0, 2.0, 4.0, 8.0))
    assert [(a.dp, a.epsilon) for a in arms] == [
        (False, None), (True, 1.0), (True, 2.0), (True, 4.0), (True, 8.0)]
    assert "privacy.target_epsilon=2" in arms[2].overrides
    assert arms[0].overrides == ["privacy.enabled=false"]  # off even where a scenario is on
    with pytest.raises(ConfigError, match="epsilons must be one or more budgets > 0"):
        grid(["fedavg"], [True], (0.0, 8.0))


def test_frontier_plot_draws_each_budget(tmp_path):
    import matplotlib.image

    from fedcpt.simulations.compare import plot_frontier

    rows = [{"arm": "fedavg", "dp": False, "target_epsilon": None, "adaptation": 0.6,
             "forgetting": 0.13}]
    rows += [{"arm": "fedavg", "dp": True, "target_epsilon": e, "adaptation": 0.1 * e,
              "forgetting": 0.01 * e} for e in (8.0, 1.0, 4.0, 2.0)]
    path = tmp_path / "frontier.png"
    plot_frontier(rows, path)
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (715, 715)  # 6.5 in × 110 dpi, both panels


@pytest.fixture(scope="module")
def frontier_and_default_run(tmp_path_factory, sites_config) -> tuple[Path, dict]:
    """One real comparison on one engine start: plain FedAvg off and at ε 2 and 8 (the
    frontier), and the smoke analogue of the default run (DP + SecAgg+ + protection)."""
    from fedcpt.simulations.compare import DEFAULT_RUN

    out = tmp_path_factory.mktemp("compare") / "product"
    payload = compare("smoke", out, ["fedavg", DEFAULT_RUN], [False, True], [],
                      config_file=sites_config, epsilons=(2.0, 8.0),
                      default_scenario="smoke-default")
    return out, payload


@pytest.mark.slow  # shares one real comparison (four runs) with the default-run test below
def test_compare_dp_frontier_on_smoke(frontier_and_default_run):
    out, payload = frontier_and_default_run
    dp_rows = {r["target_epsilon"]: r for r in payload["arms"]
               if r["dp"] and r["arm"] == "fedavg"}
    assert set(dp_rows) == {2.0, 8.0}
    for target, row in dp_rows.items():
        assert 0 < row["epsilon"] <= target  # the budget spent, never above it
        assert row["adaptation_kept"] == pytest.approx(1.0)  # its own reference
        assert (out / f"fedavg-dp-eps{target:g}" / "summary.json").is_file()
    assert (out / "frontier.png").is_file() and (out / "pareto.png").is_file()


def test_the_default_run_arm_runs_its_own_scenario_once_beside_plain_fedavg():
    from fedcpt.simulations.compare import DEFAULT_RUN

    arms = grid([DEFAULT_RUN], [False], default_scenario="smoke-default")
    assert [(a.name, a.dp, a.scenario) for a in arms] == [
        ("fedavg", False, None), (DEFAULT_RUN, True, "smoke-default")]
    assert arms[1].overrides == []  # as shipped: no arm overrides, no DP switch
    # with DP arms too, it runs once, last
    arms = grid([DEFAULT_RUN, "rehearsal-mix"], [False, True])
    assert [a.name for a in arms].count(DEFAULT_RUN) == 1 and arms[-1].name == DEFAULT_RUN
    # it is measured against plain FedAvg without DP, so that reference must run
    with pytest.raises(ConfigError, match="include off in --dp"):
        grid([DEFAULT_RUN], [True])


def test_the_default_run_is_measured_against_plain_fedavg_without_dp(tmp_path):
    from fedcpt.simulations.compare import DEFAULT_RUN, Arm, against_reference, arm_row

    fedavg_off, fedavg_on = grid(["fedavg"], [False, True])
    default = Arm(DEFAULT_RUN, True, [], 8.0, scenario="smoke-default")
    dp_summary = {**_summary(0.0, 0.3, None), "privacy": {"max_epsilon": 7.9}}
    rows = [arm_row(fedavg_off, _summary(0.2, 0.5, None), tmp_path / "a"),
            arm_row(fedavg_on, {**_summary(0.1, 0.2, None),
                                "privacy": {"max_epsilon": 8.0}}, tmp_path / "b"),
            arm_row(default, dp_summary, tmp_path / "c")]
    against_reference(rows)
    assert rows[2]["reference"] == {"forgetting": 0.2, "adaptation": 0.5}  # DP off's
    assert rows[2]["adaptation_kept"] == pytest.approx(0.6)
    assert rows[2]["epsilon"] == 7.9 and rows[2]["strategy"] == []


@pytest.mark.slow  # the smoke analogue of the default run: DP + SecAgg+ + protection
def test_compare_runs_the_default_run_beside_plain_fedavg(frontier_and_default_run):
    from fedcpt.simulations.compare import DEFAULT_RUN

    out, payload = frontier_and_default_run
    arms = {r["arm"]: r for r in payload["arms"] if not (r["dp"] and r["arm"] == "fedavg")}
    assert set(arms) == {"fedavg", DEFAULT_RUN}
    row = arms[DEFAULT_RUN]
    assert row["dp"] and 0 < row["epsilon"] <= 8.0  # spent, never above the budget
    assert row["reference"]["adaptation"] == arms["fedavg"]["adaptation"]
    summary = json.loads((out / DEFAULT_RUN / "summary.json").read_text())
    assert summary["secagg"]["enabled"]  # the server saw only the sites' sum
    assert (out / DEFAULT_RUN / "simulated-ca.pem").is_file()  # signing identities made
    manifest = json.loads((out / DEFAULT_RUN / "manifest.json").read_text())
    strategy = manifest["config"]["strategy"]  # the server's protection, as `shakespeare`'s
    assert strategy["rehearsal"] == "mix" and strategy["distillation"] == "chat"
    # the sites held out the reference's units: the base model's held-out loss is the
    # same (under SecAgg+ the sites release it only as a quantised sum, not per site)
    domain = [json.loads((out / arm / "summary.json").read_text())["domain_loss"]
              for arm in ("fedavg", DEFAULT_RUN)]
    assert len(domain[0]["per_site"]) == 3 and domain[1]["secure_sum"]["sites"]
    assert domain[1]["base"] == pytest.approx(domain[0]["base"], abs=1e-3)
    assert row["adaptation"] is not None
    assert "default-run" in (out / "compare.md").read_text()
