"""Drift alarms that act: the signals against a window, and the rollback in a real run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedcpt.config import MonitorConfig, load_config
from fedcpt.exceptions import ConfigError
from fedcpt.runfolder.paths import RunFolder
from fedcpt.runfolder.records import RoundRecord, read_rounds
from fedcpt.server.drift import check_drift
from fedcpt.simulations.runner import Job, prepare, simulate_many


def _row(n: int, general: float, norm: float | None, flags=(), aggregated=True):
    return RoundRecord(
        round=n, phase="all", general_loss=general, general_perplexity=0.0, general_ece=0.0,
        domain_loss=None, domain_per_site={}, domain_ece=None, aggregated=aggregated,
        sites_trained=[], train_loss=None, update_norm_per_site={}, bytes_up_per_client=0,
        failures=[], server_steps={}, elapsed_s=0.0, update_norm=norm,
        drift={"flags": list(flags)} if n else {})


HISTORY = [_row(0, 5.0, None), _row(1, 4.8, 1.0), _row(2, 4.7, 1.2), _row(3, 4.6, 0.8)]


def test_an_outsized_update_rolls_back_to_the_last_good_version():
    cfg = MonitorConfig(window=3, update_drift=3.0)
    drift = check_drift(cfg, HISTORY, update_norm=4.0, general_loss=4.6)
    assert drift.update_ratio == pytest.approx(4.0)  # median of 1.0, 1.2, 0.8
    assert drift.rolled_back_to == 3 and "update drift" in drift.flags[0]


def test_a_general_loss_rise_over_the_window_is_flagged():
    cfg = MonitorConfig(window=2, general_loss_drift=0.3, action="flag")
    drift = check_drift(cfg, HISTORY, update_norm=1.0, general_loss=5.0)
    assert drift.general_loss_rise == pytest.approx(0.4)  # over round 3's 4.6
    assert drift.flags and drift.rolled_back_to is None  # action = flag: no rollback


def test_ordinary_rounds_are_not_flagged_and_flagged_rounds_leave_the_window():
    cfg = MonitorConfig(window=3, update_drift=3.0, general_loss_drift=0.3)
    assert not check_drift(cfg, HISTORY, update_norm=1.5, general_loss=4.7).flags
    # Round 4 was flagged and rolled back: the last good version is still 3.
    history = HISTORY + [_row(4, 6.0, 9.0, flags=["update drift"], aggregated=False)]
    drift = check_drift(cfg, history, update_norm=9.0, general_loss=6.0)
    assert drift.update_ratio == pytest.approx(9.0) and drift.rolled_back_to == 3


def test_monitor_thresholds_are_checked():
    with pytest.raises(ConfigError, match="monitor.update_drift"):
        MonitorConfig(update_drift=0.5)
    with pytest.raises(ConfigError, match="monitor.window"):
        MonitorConfig(window=0)


def _federation(root, make_text, third_round_site: str) -> Job:
    """The prepared run (in ``root/run``) of a federation in which north, south and east
    train on English prose for two rounds; round 3 is trained by
    ``third_round_site`` alone (east-switched: east's data switched to a corpus of one
    repeated letter; averaged with two unswitched sites it moves the general loss by only
    ~0.01 at this LR). General-loss drift rollback on; LoRA on every projection at LR 0.01
    (0.05 overshoots by round 2 and raises the general loss with no switch)."""
    lines = []
    for i, name in enumerate(("north", "south", "east")):
        path = root / f"{name}.txt"
        path.write_text(make_text(40_000, seed=100 + i), encoding="utf-8")
        lines += ["[[sites]]", f'name = "{name}"', f'data = ["{path.as_posix()}"]', ""]
    # The server's general text is prose of the same kind as the sites' (another seed), so
    # ordinary rounds lower the general loss and only the switch raises it: the shipped
    # general kinds (code, C, legal, ...) rise under any narrow training at this LR.
    general = root / "general.txt"
    general.write_text(make_text(40_000, seed=999), encoding="utf-8")
    switched = root / "east-switched.txt"
    switched.write_text("\n\n".join(f"{i} " + "z" * 400 for i in range(100)),
                        encoding="utf-8")
    lines += ["[[sites]]", 'name = "east-switched"', f'data = ["{switched.as_posix()}"]', "",
              "[data]", f'general = ["{general.as_posix()}"]', "",
              "[train]", "lr = 0.01", "",
              "[lora]", 'target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", '
              '"gate_proj", "up_proj", "down_proj"]', "",
              "[federation]", "rounds = 3", "max_update_norm = 0.0", "",
              "[monitor]", "window = 2", "general_loss_drift = 0.005", "",
              "[[phases]]", 'name = "before"', "rounds = 2",
              'sites = ["north", "south", "east"]', "",
              "[[phases]]", 'name = "after"', "rounds = 1",
              f'sites = ["{third_round_site}"]', ""]
    config = root / "sites.toml"
    config.write_text("\n".join(lines), encoding="utf-8")
    return prepare(load_config("smoke", config_file=config), root / "run")


@pytest.fixture(scope="module")
def drift_runs(tmp_path_factory, make_text) -> tuple[Path, Path]:
    """The switched and the unswitched federation, on one engine start: their run folders."""
    switched = _federation(tmp_path_factory.mktemp("switched"), make_text, "east-switched")
    unswitched = _federation(tmp_path_factory.mktemp("unswitched"), make_text, "east")
    simulate_many([switched, unswitched])
    return switched.run_dir, unswitched.run_dir


@pytest.mark.slow  # two real simulations
def test_a_site_switching_corpus_is_flagged_within_one_round_and_rolled_back(drift_runs):
    switched_run, unswitched_run = drift_runs
    from fedcpt.core.adapters import load_version
    from fedcpt.core.model import load_adapted_model

    control = read_rounds(RunFolder(unswitched_run))
    rows = read_rounds(RunFolder(switched_run))
    signals = [(r.round, r.drift) for r in control + rows]
    assert not any(r.drift.get("flags") for r in control), signals  # no switch, no flag
    assert [bool(r.drift.get("flags")) for r in rows[1:]] == [False, False, True]
    switched = rows[3]
    assert "general-loss drift" in switched.drift["flags"][0]
    assert switched.drift["rolled_back_to"] == 2 and not switched.aggregated
    assert switched.general_loss == pytest.approx(rows[2].general_loss, abs=1e-6)
    cfg = load_config("smoke")
    ref = load_adapted_model(cfg.model, dataclasses.replace(
        cfg.lora, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj")), cfg.seed).initial_adapter
    v2 = load_version(switched_run / "adapters" / "round-002", ref)
    v3 = load_version(switched_run / "adapters" / "round-003", ref)
    for key in v2.keys():
        np.testing.assert_array_equal(v2[key].numpy(), v3[key].numpy())
    version = json.loads((switched_run / "adapters" / "round-003" / "version.json").read_text())
    assert version["sites"] == []  # the rolled-back version carries no round-3 update
    report = (switched_run / "report.md").read_text()
    assert "## Drift" in report and "rolled back to version 2" in report


def test_the_report_plots_the_signals_and_lists_the_rollback(tmp_path):
    from fedcpt.server.reports.report import drift_lines

    rolled = dataclasses.replace(
        _row(4, 6.0, 9.0, flags=["update drift"], aggregated=False),
        drift={"update_ratio": 9.0, "general_loss_rise": 1.4, "flags": ["update drift"],
               "rolled_back_to": 3})
    signals = [dataclasses.replace(r, drift={"update_ratio": 1.0, "general_loss_rise": -0.1,
                                             "flags": [], "rolled_back_to": None})
               for r in HISTORY[1:]]
    folder = RunFolder(tmp_path)
    lines = drift_lines(folder, [HISTORY[0], *signals, rolled],
                        load_config("smoke", overrides=["monitor.update_drift=3"]))
    assert (tmp_path / "drift.png").is_file()
    assert "| 4 | 9.000 | 9.00 | +1.4000 | yes | 3 |" in lines
    legend = next(line for line in lines if line.startswith("Global update norm"))
    assert "(threshold 3×)" in legend and "(threshold off)" in legend  # not "off nats"


def test_general_loss_drift_compares_with_the_last_evaluated_rounds():
    """Under federation.eval_every, unevaluated rounds (no general loss) are skipped."""
    unevaluated = dataclasses.replace(_row(4, 0.0, 1.1), general_loss=None, evaluated=False)
    cfg = MonitorConfig(window=2, general_loss_drift=0.3, action="flag")
    drift = check_drift(cfg, HISTORY + [unevaluated], update_norm=1.0, general_loss=5.0)
    assert drift.general_loss_rise == pytest.approx(0.4)  # over round 3's 4.6
    assert check_drift(cfg, HISTORY, update_norm=1.0, general_loss=None).general_loss_rise \
        is None
