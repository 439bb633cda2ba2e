"""The terminal view of a simulation: round, per-site state, loss, ε, elapsed time and ETA.

It is fed the run's streamed log lines (:meth:`LiveView.feed`): progress events
(:mod:`fedcpt.core.progress`) update the view, fedcpt's warnings and errors are printed
above it, and everything else (Flower, Ray and transformers chatter, the config dump)
stays in ``run.log`` unless ``verbose``. On a terminal the view redraws in place (rich
``Live``); elsewhere each event is printed as a plain line.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedcpt.core.progress import ProgressEvent, parse

_FEDCPT_ALERT = re.compile(r"\b(WARNING|ERROR|CRITICAL) (fedcpt[\w.]*): (.*)$")


@dataclass
class SiteRow:
    state: str = "waiting"
    loss: float | None = None


@dataclass
class RunState:
    """What the view shows, updated event by event (events may arrive twice: idempotent)."""

    rounds: int = 0
    round: int = 0
    phase: str = "starting"
    rounds_done: int = 0
    general_loss: float | None = None
    sites: dict[str, SiteRow] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    first_round_started: float | None = None

    def apply(self, event: ProgressEvent) -> None:
        f = event.fields
        if event.kind == "run":
            self.rounds = int(f.get("rounds") or self.rounds)
            for name in f.get("sites") or []:
                self.sites.setdefault(str(name), SiteRow())
            return
        server_round = int(f.get("round") or 0)
        if event.kind == "round":
            if server_round < self.round:  # the last round's general evaluation, recorded
                self._round_done(server_round, f)  # while the sites train this one
                return
            self.round = server_round
            self.phase = str(f.get("state", self.phase))
            if self.phase == "training" and self.first_round_started is None:
                self.first_round_started = time.monotonic()
            if self.phase in ("training", "evaluating"):
                for row in self.sites.values():
                    if row.state != "failed" or self.phase == "training":
                        row.state = self.phase
            if self.phase == "done":
                for row in self.sites.values():
                    if row.state == "evaluating":
                        row.state = "done"
                self._round_done(server_round, f)
        elif event.kind == "site":
            row = self.sites.setdefault(str(f.get("site")), SiteRow())
            row.state = str(f.get("state", row.state))
            if f.get("loss") is not None:
                row.loss = float(f["loss"])

    def _round_done(self, server_round: int, f: dict) -> None:
        self.rounds_done = max(self.rounds_done, server_round)
        if f.get("general_loss") is not None:
            self.general_loss = float(f["general_loss"])

    def eta_s(self) -> float | None:
        """Seconds left at the mean pace of the finished rounds (None before one ends)."""
        if not self.rounds_done or self.first_round_started is None:
            return None
        per_round = (time.monotonic() - self.first_round_started) / self.rounds_done
        return per_round * max(0, self.rounds - self.rounds_done)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def render(state: RunState) -> Table:
    elapsed = time.monotonic() - state.started
    title = (f"round {state.round}/{state.rounds or '?'} · {state.phase} · "
             f"elapsed {_clock(elapsed)} · ETA {_clock(state.eta_s())}")
    if state.general_loss is not None:
        title += f" · general loss {state.general_loss:.4f}"
    table = Table(title=title, title_justify="left", min_width=len(title))  # title: one line
    for col in ("site", "state", "train loss"):  # no ε: no reply carries it (it reveals N)
        table.add_column(col)
    style = {"failed": "red", "done": "green", "training": "yellow", "evaluating": "cyan"}
    for name, row in state.sites.items():
        table.add_row(name, f"[{style.get(row.state, 'dim')}]{row.state}[/]",
                      "—" if row.loss is None else f"{row.loss:.4f}")
    return table


class LiveView:
    """A context manager: ``with LiveView(console) as view: ... view.feed(line)``."""

    def __init__(self, console: Console, verbose: bool = False) -> None:
        self.console = console
        self.verbose = verbose
        self.state = RunState()
        self._live: Live | None = None
        self._last_printed = ""

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(render(self.state), console=self.console,
                              refresh_per_second=2, get_renderable=self._renderable)
            self._live.__enter__()
        return self

    def _renderable(self) -> Table:
        return render(self.state)

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def feed(self, line: str) -> None:
        event = parse(line)
        if event is not None:
            self.state.apply(event)
            text = line[line.index("progress "):]
            # Not a terminal: the event as a plain line, once (a root handler that a library
            # installs, as Opacus does on import, would stream it a second time).
            if self._live is None and text != self._last_printed:
                # soft_wrap: one event, one line, however narrow the console
                self.console.print(text, markup=False, highlight=False, soft_wrap=True)
                self._last_printed = text
            return
        if self.verbose:
            self.console.print(line, markup=False, highlight=False)
            return
        alert = _FEDCPT_ALERT.search(line)
        if alert is not None:
            level, name, message = alert.groups()
            style = "bold yellow" if level == "WARNING" else "bold red"
            self.console.print(Text.assemble((level.lower(), style), " ", message))
