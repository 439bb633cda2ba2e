"""`fedcpt simulate` with bad input: exit code 2, one `error:` line, and no run folder.

Every case here fails before Ray starts, in the time it takes to import the package.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, columns: int | None = 400) -> subprocess.CompletedProcess:
    """``python -m fedcpt.cli ARGS`` with stderr piped (as in CI or a log file).

    ``columns`` sets COLUMNS for the child; ``None`` leaves the terminal width unset, as
    when a user or a CI job pipes stderr.
    """
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "fedcpt.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line saying ``error:`` (asserts there is exactly one)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_no_run(out: Path) -> None:
    assert not (out / "summary.json").exists()
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def sites_config(tmp_path: Path, *paths: Path | str, name: str = "alpha") -> Path:
    lines = []
    for i, p in enumerate(paths):
        lines += ["[[sites]]", f'name = "{name}{i or ""}"', f'data = ["{Path(p).as_posix()}"]',
                  ""]
    config = tmp_path / "sites.toml"
    config.write_text("\n".join(lines), encoding="utf-8")
    return config


def test_unknown_scenario(tmp_path):
    out = tmp_path / "run"
    line = error_line(run_cli("simulate", "nosuch", "--out", str(out)))
    assert "unknown scenario 'nosuch'" in line
    assert "smoke" in line  # lists what is available
    assert_no_run(out)


def test_unknown_set_key(tmp_path):
    out = tmp_path / "run"
    line = error_line(run_cli("simulate", "smoke", "--set", "train.lrr=0.1", "--out", str(out)))
    assert "unknown config key `train.lrr` (did you mean `train.lr`?)" in line
    assert_no_run(out)


def test_invalid_set_value(tmp_path):
    out = tmp_path / "run"
    line = error_line(run_cli("simulate", "smoke", "-s", "federation.rounds=0", "-o", str(out)))
    assert "`federation.rounds` must be > 0, got 0" in line
    assert_no_run(out)


def test_missing_config_file(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "nope.toml"
    line = error_line(run_cli("simulate", "smoke", "--config", str(missing), "--out", str(out)))
    assert f"config file not found: {missing}" in line
    assert_no_run(out)


def test_missing_site_data(tmp_path, write_text):
    out = tmp_path / "run"
    good = write_text("good.txt", 30_000)
    missing = tmp_path / "data" / "missing.txt"
    config = sites_config(tmp_path, good, missing)
    line = error_line(run_cli("simulate", "smoke", "--config", str(config), "--out", str(out)))
    assert f"data path not found: {missing}" in line
    assert_no_run(out)


def test_non_empty_out_folder_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results", encoding="utf-8")
    line = error_line(run_cli("simulate", "smoke", "--out", str(out)))
    assert f"output folder {out} already exists and is not empty" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_error_stays_on_one_line_when_piped(tmp_path):
    """A long message (a deep data path) must not be hard-wrapped at 80 columns."""
    out = tmp_path / "run"
    missing = tmp_path / ("a_long_directory_name_" * 3) / "missing_site_data.txt"
    config = sites_config(tmp_path, missing)
    proc = run_cli("simulate", "smoke", "--config", str(config), "--out", str(out),
                   columns=None)
    line = error_line(proc)
    assert str(missing) in line, proc.stderr
    assert_no_run(out)


@pytest.mark.parametrize("site", ["alpha"])
def test_error_text_is_not_read_as_markup(tmp_path, site):
    """Square brackets in a message (``sites[<name>].data``) are printed as they are."""
    config = tmp_path / "sites.toml"
    config.write_text(f'[[sites]]\nname = "{site}"\ndata = []\n', encoding="utf-8")
    out = tmp_path / "run"
    line = error_line(run_cli("simulate", "smoke", "--config", str(config), "--out", str(out)))
    assert f"`sites[{site}].data` must be at least one data source" in line
    assert_no_run(out)


def test_impossible_privacy_budget(tmp_path, write_text):
    out = tmp_path / "run"
    config = sites_config(tmp_path, write_text("site.txt", 30_000))
    line = error_line(run_cli("simulate", "smoke-dp", "--config", str(config),
                              "--set", "privacy.target_epsilon=0.0001", "--out", str(out)))
    assert "privacy budget ε=0.0001" in line and "too small" in line
    assert_no_run(out)


def test_tampered_ledger_stops_the_run_and_is_left_as_it_was(tmp_path, write_text):
    from fedcpt.privacy.ledger import PrivacyLedger

    ledgers = tmp_path / "ledgers"
    ledger = PrivacyLedger.open(ledgers / "alpha.ledger.json", "alpha", delta=1e-4,
                                target_epsilon=8.0)
    ledger.record("earlier-run", 1, 1.0, 0.01, 10)
    path = ledgers / "alpha.ledger.json"
    path.write_text(path.read_text().replace('"steps": 10', '"steps": 1'))
    tampered = path.read_text()
    out = tmp_path / "run"
    config = sites_config(tmp_path, write_text("site.txt", 30_000))
    line = error_line(run_cli("simulate", "smoke-dp", "--config", str(config), "--set",
                              f"privacy.ledger_dir={ledgers}", "--out", str(out)))
    assert "checksum mismatch" in line
    assert path.read_text() == tampered
    assert_no_run(out)


def test_a_runtime_failure_keeps_the_run_log_it_points_to(tmp_path, monkeypatch):
    """Flower's runtime stopping without a result (e.g. Ray's node timing out at start-up)
    is not bad input: the folder keeps the run.log that the error names."""
    from typer.testing import CliRunner

    from fedcpt import cli
    from fedcpt.cli_output import CHATTER
    from fedcpt.exceptions import SimulationFailed
    from fedcpt.simulations import runner

    def failing_run(cfg, run_dir, **_):
        (run_dir / "run.log").open("a").write("The current node timed out during startup\n")
        raise SimulationFailed(f"the simulation ended without a result (flwr run exit 0); "
                               f"see {run_dir / 'run.log'}")

    monkeypatch.setattr(runner, "simulate", failing_run)
    out = tmp_path / "run"
    loggers = [logging.getLogger(n) for n in ("", *CHATTER)]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:  # in-process, the CLI configures logging for the whole test session: restore it
        result = CliRunner().invoke(cli.cli, ["simulate", "smoke", "--out", str(out)])
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    assert result.exit_code != 0 and isinstance(result.exception, SimulationFailed)
    assert "timed out during startup" in (out / "run.log").read_text()


def test_scenarios_lists_each_description_whole_and_wrapped():
    proc = run_cli("scenarios", columns=80)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    text = " ".join(line.strip() for line in lines)
    assert ("smoke Smoke: three tiny sites, a tiny random Llama and a byte tokenizer -- the "
            "same code path as the real scenario, finishing in about a minute. ") in \
        " ".join(text.split()) + " "


def test_the_cli_leaves_its_objects_out_of_the_last_collection_at_exit():
    # once torch and Flower are imported the collection at exit walks ~580k objects
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
             "from fedcpt.cli import main\n"
             "sys.argv = ['fedcpt', 'scenarios']\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "frozen True"
