"""Progress of a sync, shown on stderr while `connector sync` runs.

The engine reports `ProgressEvent`s: rows read from a segment's source, then per destination
rows sent of the total to send. `connector sync` renders them as a live display on a terminal
(`RichProgress`) and, under cron or CI, as a log line every ~10 seconds (`LogProgress`) with the
rows so far, the rate and an estimate of what is left. Neither ever sees a row's content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgressBar

Phase = Literal["reading", "planning", "sending", "done"]


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    segment: str
    destination: str | None  # None while the segment's source is read (once for all its destinations)
    phase: Phase
    done: int  # rows read, or rows sent
    total: int | None  # rows to send; None when unknown (a source is read without knowing its size)


Progress = Callable[[ProgressEvent], None]

log = logging.getLogger("connector.progress")


def _what(ev: ProgressEvent) -> str:
    return f"{ev.segment} -> {ev.destination}" if ev.destination else ev.segment


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass(slots=True)
class _Phase:
    started: float
    done0: int
    done: int = 0
    total: int | None = None


class LogProgress:
    """A log line at most every `interval` seconds (and when a pair is done): rows, rows/s, time left."""

    def __init__(self, emit: Callable[[str], None] | None = None, *, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._emit = emit or log.info
        self._interval = interval
        self._clock = clock
        self._phases: dict[tuple[str, str | None, str], _Phase] = {}
        self._last_line: float | None = None

    def __call__(self, ev: ProgressEvent) -> None:
        now = self._clock()
        if self._last_line is None:
            self._last_line = now  # the first line comes one interval after the sync started
        if ev.phase == "done":
            sent = self._phases.pop((ev.segment, ev.destination, "sending"), None)
            took = f" in {_duration(now - sent.started)}" if sent else ""
            self._emit(f"{ev.phase} {_what(ev)}: {ev.done:,} rows sent{took}")
            self._last_line = now
            return
        key = (ev.segment, ev.destination, ev.phase)
        phase = self._phases.get(key)
        if phase is None:
            # the rate counts from the first report of a phase: rows before it took unknown time
            phase = self._phases[key] = _Phase(started=now, done0=ev.done)
        phase.done, phase.total = ev.done, ev.total
        if now - self._last_line >= self._interval:
            self._emit(self.line(ev, phase, now))
            self._last_line = now

    @staticmethod
    def line(ev: ProgressEvent, phase: _Phase, now: float) -> str:
        elapsed = now - phase.started
        rate = (phase.done - phase.done0) / elapsed if elapsed > 0 else 0.0
        text = f"{ev.phase} {_what(ev)}: {ev.done:,}"
        if ev.total is not None:
            text += f" of {ev.total:,} rows ({100 * ev.done / ev.total:.0f}%)" if ev.total else " of 0 rows"
        else:
            text += " rows"
        text += f", {rate:,.0f} rows/s"
        if ev.total is not None and rate > 0:
            text += f", about {_duration(max(0, ev.total - ev.done) / rate)} left"
        return text

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class RichProgress:
    """A live display on a terminal: one line per segment being read and per pair being sent."""

    def __init__(self, console: Console, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.bar = RichProgressBar(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>12,.0f}{task.fields[of]} rows"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            get_time=clock,
            transient=False,
        )
        self._tasks: dict[tuple[str, str | None], TaskID] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        key = (ev.segment, ev.destination)
        task = self._tasks.get(key)
        description = f"{'sent' if ev.phase == 'done' else ev.phase} {_what(ev)}"
        of = f" of {ev.total:,}" if ev.total is not None else ""
        if task is None:
            task = self._tasks[key] = self.bar.add_task(description, total=ev.total, of=of, rate="")
        self.bar.update(task, description=description, completed=ev.done, total=ev.total, of=of)
        speed = self.bar.tasks[self._index(task)].speed
        self.bar.update(task, rate=f"{speed:,.0f} rows/s" if speed else "")
        if ev.phase == "done":
            self.bar.update(task, total=ev.done, completed=ev.done, of="", rate="")
            self.bar.stop_task(task)

    def _index(self, task: TaskID) -> int:
        return next(i for i, t in enumerate(self.bar.tasks) if t.id == task)

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.bar.stop()


def renderer(console: Console, *, interval: float = 10.0) -> LogProgress | RichProgress:
    """The progress display `connector sync` uses: live on a terminal, log lines otherwise."""
    if console.is_terminal:
        return RichProgress(console)
    return LogProgress(interval=interval)
