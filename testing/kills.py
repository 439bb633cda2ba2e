"""Kill a DP site or the server at chosen points, restart it, and compare the privacy
ledgers and rounds with an uninterrupted run.

A kill is *survived* when the restarted work finishes every round once, no site's ledger
differs from the uninterrupted run's (same rounds, σ, q and steps, so the same ε), and no
round is lost or paid twice.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedcpt.config import load_config
from fedcpt.core.data import read_texts, split_documents
from fedcpt.privacy.heldout import share_splits
from fedcpt.privacy.ledger import PrivacyLedger
from fedcpt.privacy.site_files import LEDGER_SUFFIX
from fedcpt.testing.site_process import POINTS

log = logging.getLogger(__name__)

SITES = ("north", "south", "east")
# What the restarted site must log for the killed round: trained afresh, recorded a stored
# update's spend, or resent a paid one.
RECOVERY = {
    "training": "site site round {r}: loss",
    "update-write": "site site round {r}: loss",
    "ledger-write": "round {r} of run client-kills was trained but not recorded",
    "after-ledger-write": "round {r} of run client-kills is already paid for; resending",
    "after-reply": "round {r} of run client-kills is already paid for; resending",
}


@dataclass
class KillReport:
    """What a series of kills did to one federation (or one site)."""

    kills: list[dict] = field(default_factory=list)
    ledger_mismatches: int = 0
    lost_rounds: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def survived(self) -> int:
        return sum(k["survived"] for k in self.kills) if not self.problems else 0


def write_corpus(folder: Path, parts: int) -> list[Path]:
    """``parts`` disjoint text files of Python's own documentation (offline, ~40 kB each)."""
    docs = split_documents(read_texts("stdlib:topics"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(parts):
        path = folder / f"part-{i}.txt"
        path.write_text("\n\n".join(docs[i::parts][:40]), encoding="utf-8")
        paths.append(path)
    return paths


def ledger_rows(ledger: PrivacyLedger) -> list[tuple]:
    """A ledger's spend, comparable across runs: (round, σ, q, steps) per entry."""
    return [(e.round, e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries]


def compare_ledgers(expected: PrivacyLedger, got: PrivacyLedger, rounds: int,
                    report: KillReport) -> None:
    """Count a mismatch unless ``got`` holds exactly what ``expected`` holds: every round
    1..rounds once, same DP parameters, one run, and the same ε."""
    name = got.site
    recorded = [e.round for e in got.entries]
    lost = sorted(set(range(1, rounds + 1)) - set(recorded))
    twice = sorted({r for r in recorded if recorded.count(r) > 1})
    report.lost_rounds += len(lost)
    ok = (ledger_rows(got) == ledger_rows(expected) and len({e.run for e in got.entries}) == 1
          and got.epsilon() == expected.epsilon() and not lost and not twice)
    if not ok:
        report.ledger_mismatches += 1
        report.problems.append(
            f"ledger of {name}: rounds {recorded} (lost {lost}, twice {twice}), "
            f"ε {got.epsilon():.4f} vs {expected.epsilon():.4f} uninterrupted")


# --- client kills ------------------------------------------------------------------------
def _site(workdir: Path, config: Path, data: Path, name: str, kill: str = "",
          ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedcpt.testing.site_process", "--config", str(config),
           "--data", str(data), "--ledger", str(workdir / name / f"site{LEDGER_SUFFIX}"),
           "--run-id", "client-kills", "--replies", str(workdir / name / "replies")]
    if kill:
        cmd += ["--kill", kill]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def client_kills(workdir: Path, points: tuple[str, ...] = tuple(POINTS)) -> KillReport:
    """One DP site killed once at each of ``points`` (point i in round i), restarted each
    time, against the same site run without kills."""
    rounds = len(points) + 1
    cfg = load_config("smoke-dp", overrides=[f"federation.rounds={rounds}"])
    config = workdir / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(cfg.to_json())
    data = write_corpus(workdir / "data", 1)[0]
    report = KillReport()
    whole = _site(workdir, config, data, "whole")
    if whole.returncode != 0:
        report.problems.append(f"uninterrupted site failed: {whole.stderr[-2000:]}")
        return report
    # the held-out split's salt is fresh per ledger folder: the killed site starts from the
    # uninterrupted one's split record, so both train on the same units (the same N, q, σ)
    share_splits(workdir / "whole", workdir / "killed")
    logs: list[str] = []  # stderr of each start of the killed site
    for i, point in enumerate(points, 1):
        killed = _site(workdir, config, data, "killed", kill=f"{i}:{point}")
        logs.append(killed.stderr)
        dead = (killed.returncode == -signal.SIGKILL
                and f"killing site at {point}" in killed.stderr)
        report.kills.append({"point": point, "round": i, "what": POINTS[point],
                             "killed": dead, "recovered": False, "survived": False})
        if not dead:
            report.problems.append(f"site was not killed at {point} (exit "
                                   f"{killed.returncode}): {killed.stderr[-2000:]}")
            return report
        log.info("site killed at %s in round %d", point, i)
    last = _site(workdir, config, data, "killed")
    logs.append(last.stderr)
    if last.returncode != 0:
        report.problems.append(f"restarted site failed: {last.stderr[-2000:]}")
        return report
    for i, kill in enumerate(report.kills, 1):
        # the next start (with the next kill, or the last one) re-asked round i first
        kill["recovered"] = RECOVERY[kill["point"]].format(r=i) in logs[i]
        kill["survived"] = kill["killed"] and kill["recovered"]
        if not kill["recovered"]:
            report.problems.append(f"round {i} after a kill at {kill['point']} was not "
                                   f"recovered as expected: {logs[i][-2000:]}")
    expected = PrivacyLedger.load(workdir / "whole" / f"site{LEDGER_SUFFIX}")
    got = PrivacyLedger.load(workdir / "killed" / f"site{LEDGER_SUFFIX}")
    compare_ledgers(expected, got, rounds, report)
    replies = workdir / "killed" / "replies"
    report.lost_rounds += sum(not (replies / f"round-{r:03d}.safetensors").exists()
                              for r in range(1, rounds + 1))
    return report


# --- server kills ------------------------------------------------------------------------
def sites_config(workdir: Path) -> Path:
    """A TOML of three local sites for the smoke scenarios."""
    lines = []
    for name, path in zip(SITES, write_corpus(workdir / "data", len(SITES)), strict=True):
        lines += ["[[sites]]", f'name = "{name}"', f'data = ["{path.as_posix()}"]', ""]
    config = workdir / "sites.toml"
    config.write_text("\n".join(lines), encoding="utf-8")
    return config


def _fedcpt(*args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "fedcpt.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _rows(run: Path) -> list[dict]:
    metrics = run / "metrics.jsonl"
    rows = []
    for line in (metrics.read_text().splitlines() if metrics.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def _paid_rounds(ledgers: Path) -> set[int]:
    """Rounds every site's ledger in the folder ``ledgers`` has recorded so far."""
    files = list(ledgers.glob(f"*{LEDGER_SUFFIX}"))
    if len(files) < len(SITES):
        return set()
    per_site = [{e.round for e in PrivacyLedger.load(f).entries} for f in files]
    return set.intersection(*per_site)


def paid_window(server_round: int, ledgers: Path) -> Callable[[Path], bool | None]:
    """Kill when every site (its ledger in ``ledgers``) has paid for ``server_round`` but
    the server has not finished it: the window in which a resumed server asks for paid
    rounds again. None: missed."""
    def ready(run: Path) -> bool | None:
        done = len(_rows(run)) - 1
        if done >= server_round:
            return None
        return server_round in _paid_rounds(ledgers)
    return ready


def _checkpoint(run: Path) -> dict | None:
    """The run's ``checkpoint.json`` (None before the first, or while one is being written)."""
    try:
        return json.loads((run / "checkpoint.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def round_boundary(server_round: int, ledgers: Path) -> Callable[[Path], bool | None]:
    """Kill right after ``server_round``'s version is checkpointed, before the next round is
    paid (the sites' ledgers in ``ledgers``). With ``federation.overlap_general_eval`` (the
    default) the round's general evaluation is then usually still pending: its metrics line
    only follows it, while the next round trains, so the checkpoint is the moment to watch
    (:func:`evaluation_pending` tells afterwards)."""
    def ready(run: Path) -> bool | None:
        if server_round + 1 in _paid_rounds(ledgers):
            return None
        checkpoint = _checkpoint(run)
        return checkpoint is not None and checkpoint["last_round"] >= server_round
    return ready


def evaluation_pending(run: Path) -> bool:
    """Whether the run's checkpoint holds a round whose general evaluation had not finished
    (read after a kill: the state the resumed server starts from)."""
    checkpoint = _checkpoint(run)
    return checkpoint is not None and checkpoint.get("pending") is not None


def _run_until(proc: subprocess.Popen, run: Path, ready: Callable[[Path], bool | None],
               timeout: float = 900) -> str:
    """Kill ``proc``'s whole process group once ``ready(run)``: 'killed'; 'missed' when the
    moment passed (``proc`` goes on); 'finished' when it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        state = ready(run)
        if state is None:
            return "missed"
        if state:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.02)
    return _finish(proc, timeout)


def _finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"fedcpt exited {proc.returncode}: {err[-2000:]}")
    return "finished"


def server_kills(workdir: Path, rounds: int = 4) -> KillReport:
    """A DP federation (smoke-dp, three sites) whose server process tree is SIGKILLed in
    round 1 after the sites paid, after round 2's checkpoint, and in round 3 after the
    sites paid; resumed each time; against the same federation run without kills."""
    config = sites_config(workdir)
    common = ["simulate", "smoke-dp", "--config", str(config), "--set",
              f"federation.rounds={rounds}"]
    report = KillReport()
    whole, killed = workdir / "whole", workdir / "killed"
    # Each site's held-out split has a fresh secret salt per ledger folder, so two runs would
    # hold out different units and spend at different q. The killed run's sites start
    # from the uninterrupted run's split records (same salt, same units): any difference in
    # spend is then the kills' doing.
    whole_ledgers, killed_ledgers = workdir / "whole-ledgers", workdir / "killed-ledgers"
    _finish(_fedcpt(*common, "--set", f"privacy.ledger_dir={whole_ledgers}",
                    "--out", str(whole)))
    share_splits(whole_ledgers, killed_ledgers)
    common += ["--set", f"privacy.ledger_dir={killed_ledgers}"]
    plan = [("after the sites paid, before the round finished", paid_window(1, killed_ledgers)),
            ("between rounds, after the checkpoint", round_boundary(2, killed_ledgers)),
            ("after the sites paid, before the round finished", paid_window(3, killed_ledgers))]
    proc = _fedcpt(*common, "--out", str(killed))
    outcome = ""
    for what, ready in plan:
        outcome = _run_until(proc, killed, ready)
        report.kills.append({"what": what, "rounds_done": len(_rows(killed)) - 1,
                             "evaluation_pending": evaluation_pending(killed),
                             "killed": outcome == "killed", "survived": False})
        if outcome == "finished":
            break
        if outcome == "killed":
            proc = _fedcpt("simulate", "--resume", str(killed))
    if outcome != "finished":
        _finish(proc)
    _check_server_run(killed, whole_ledgers, killed_ledgers, rounds, report)
    return report


def _check_server_run(killed: Path, whole_ledgers: Path, killed_ledgers: Path, rounds: int,
                      report: KillReport) -> None:
    rows = _rows(killed)
    seen = [r["round"] for r in rows]
    report.lost_rounds += len(set(range(rounds + 1)) - set(seen))
    if seen != list(range(rounds + 1)):
        report.problems.append(f"metrics rounds {seen}, expected 0..{rounds} once each")
    failures = [f for r in rows for f in r["failures"]]
    if failures or not (killed / "summary.json").exists():
        report.problems.append(f"resumed run: failures {failures}")
    for site in SITES:
        compare_ledgers(PrivacyLedger.load(whole_ledgers / f"{site}{LEDGER_SUFFIX}"),
                        PrivacyLedger.load(killed_ledgers / f"{site}{LEDGER_SUFFIX}"),
                        rounds, report)
    for kill in report.kills:
        kill["survived"] = kill["killed"] and not report.problems
