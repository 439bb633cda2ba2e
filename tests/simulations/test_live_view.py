"""The terminal view: progress lines survive Flower's log prefixes, drive per-site state,
and keep chatter off the screen unless --verbose."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from fedcpt.core import progress
from fedcpt.simulations.live_view import LiveView, RunState, render


def _emitted(caplog, kind: str, **fields) -> str:
    with caplog.at_level(logging.INFO, logger="fedcpt.progress"):
        progress.emit(kind, **fields)
    return caplog.records[-1].getMessage()


def test_event_round_trips_through_flower_log_prefixes(caplog):
    line = _emitted(caplog, "site", round=2, site="west clinic", state="done", loss=3.25)
    for prefix in ("", "\x1b[92mINFO \x1b[0m:      ", "12/01/2026 21:58:11:INFO:\t"):
        event = progress.parse(prefix + line)
        assert event is not None and event.kind == "site"
        assert event.fields == {"round": 2, "site": "west clinic", "state": "done",
                                "loss": 3.25}


def test_other_lines_are_not_events():
    assert progress.parse("INFO :      [ROUND 1/2]") is None
    assert progress.parse("the progress of science") is None
    with pytest.raises(ValueError, match="unknown progress event"):
        progress.emit("bogus")


def test_state_follows_a_round_with_a_failed_site():
    state = RunState()
    state.apply(progress.ProgressEvent("run", {"rounds": 3, "sites": ["a", "b"]}))
    state.apply(progress.ProgressEvent("round", {"round": 1, "state": "training"}))
    assert {r.state for r in state.sites.values()} == {"training"}
    state.apply(progress.ProgressEvent("site", {"round": 1, "site": "a", "state": "done",
                                                "loss": 2.5}))
    state.apply(progress.ProgressEvent("site", {"round": 1, "site": "b", "state": "failed"}))
    state.apply(progress.ProgressEvent("round", {"round": 1, "state": "evaluating"}))
    assert state.sites["a"].state == "evaluating" and state.sites["b"].state == "failed"
    assert state.eta_s() is None  # no round has finished yet
    state.apply(progress.ProgressEvent("round", {"round": 1, "state": "done",
                                                 "general_loss": 4.0}))
    assert state.rounds_done == 1 and state.eta_s() is not None and state.eta_s() >= 0
    assert state.sites["a"].state == "done" and state.sites["b"].state == "failed"
    text = _text(render(state))
    assert "round 1/3" in text and "ETA" in text and "general loss 4.0000" in text
    assert "2.5000" in text and "failed" in text
    assert "ε" not in text  # no ε column: no reply carries it


def test_a_rounds_evaluation_recorded_during_the_next_round_leaves_that_round_on_screen():
    state = RunState()
    state.apply(progress.ProgressEvent("run", {"rounds": 3, "sites": ["a"]}))
    state.apply(progress.ProgressEvent("round", {"round": 2, "state": "training"}))
    state.apply(progress.ProgressEvent("round", {"round": 1, "state": "done",
                                                 "general_loss": 3.5}))
    assert state.round == 2 and state.phase == "training"
    assert state.sites["a"].state == "training"
    assert state.rounds_done == 1 and state.general_loss == 3.5


def test_plain_output_shows_progress_and_fedcpt_warnings_only():
    out = io.StringIO()
    view = LiveView(Console(file=out, force_terminal=False, width=200), verbose=False)
    with view:
        view.feed('INFO :      progress round round=1 state="training"')
        view.feed('12/01/2026 21:58:11:INFO:progress round round=1 state="training"')
        view.feed("INFO :      ConfigRecord (train): {'run-config': {...}}")
        view.feed("/site-packages/transformers/x.py:1: FutureWarning: deprecated")
        view.feed("WARNING fedcpt.server.round_loop: round 1: not aggregated")
    printed = out.getvalue()
    assert printed.count('progress round round=1 state="training"') == 1  # streamed twice
    assert "round 1: not aggregated" in printed
    assert "ConfigRecord" not in printed and "FutureWarning" not in printed


def test_plain_lines_leave_out_absent_values_and_never_wrap(caplog):
    without_dp = _emitted(caplog, "site", round=1, site="north", state="done", loss=3.2107)
    with_dp = _emitted(caplog, "site", round=1, site="a site with a long name", state="done",
                       loss=None)
    assert "loss=3.2107" in without_dp and "null" not in with_dp
    assert "loss" not in with_dp  # under DP no loss is sent
    assert with_dp.endswith('state="done"')
    out = io.StringIO()
    view = LiveView(Console(file=out, force_terminal=False, width=40))
    with view:
        view.feed("INFO :      " + with_dp)
    assert out.getvalue() == with_dp[with_dp.index("progress "):] + "\n"  # one line


def test_verbose_brings_chatter_back():
    out = io.StringIO()
    view = LiveView(Console(file=out, force_terminal=False, width=200), verbose=True)
    with view:
        view.feed("INFO :      ConfigRecord (train): {'run-config': {...}}")
    assert "ConfigRecord" in out.getvalue()


def _text(table) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    return out.getvalue()
