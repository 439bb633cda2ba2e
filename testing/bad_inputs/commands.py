"""Bad input at the command line: each case runs ``python -m fedcpt.cli`` in a fresh
folder, and is handled only by exit code 2 with one ``error:`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from fedcpt.config import load_config
from fedcpt.testing.bad_inputs.judge import BadInput
from fedcpt.testing.bad_inputs.ledgers import fewer_steps, recorded_ledger, tamper


def _cli(*args: str) -> Callable[[Path], object]:
    def attempt(folder: Path) -> object:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        return subprocess.run([sys.executable, "-m", "fedcpt.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300, cwd=folder)
    return attempt


def _cli_tampered_report(folder: Path) -> object:
    path = recorded_ledger(folder)
    tamper(path, fewer_steps)
    return _cli("privacy", "report", str(path))(folder)


def _cli_forget(site: str) -> Callable[[Path], object]:
    """``adapters forget`` on a run folder that has a manifest and no adapter versions."""
    def attempt(folder: Path) -> object:
        run = folder / "run"
        (run / "adapters").mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps(
            {"run_id": "r", "config": load_config("smoke").to_dict()}))
        return _cli("adapters", "forget", str(run), site)(folder)
    return attempt


CLI = [
    BadInput("cli-forget-unknown-site", "cli", _cli_forget("comedy"),
             r"^error: site 'comedy' is not in run .*did you mean 'comedies'"),
    BadInput("cli-forget-run-without-versions", "cli", _cli_forget("comedies"),
             r"^error: .* has no stored adapter versions"),
    BadInput("cli-simulate-unknown-key", "cli", _cli("simulate", "smoke", "--set", "train.lrr=1"),
             r"^error: unknown config key `train.lrr`"),
    BadInput("cli-privacy-report-tampered-ledger", "cli", _cli_tampered_report,
             r"^error: .*checksum mismatch"),
]
