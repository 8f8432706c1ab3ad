"""Progress on stderr: a log line every ~10 s off a terminal, a live display on one (fake clocks, no sleeps)."""

from __future__ import annotations

import io

from conftest import Harness
from rich.console import Console

from connector.progress import LogProgress, ProgressEvent, RichProgress, renderer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_every_interval_with_rate_and_time_left() -> None:
    clock, lines = FakeClock(), []
    show = LogProgress(lines.append, interval=10.0, clock=clock)
    show(ProgressEvent("vip", None, "reading", 50_000, None))
    for second in range(1, 10):  # within the first interval: nothing
        clock.now += 1
        show(ProgressEvent("vip", None, "reading", 50_000 + second * 10_000, None))
    assert lines == []
    clock.now += 1  # 10 s after the first report, 100,000 rows more: 10,000 rows/s
    show(ProgressEvent("vip", None, "reading", 150_000, None))
    assert lines == ["reading vip: 150,000 rows, 10,000 rows/s"]
    clock.now += 2
    show(ProgressEvent("vip", "meta", "sending", 10_000, 300_000))
    assert len(lines) == 1  # 2 s since the last line
    clock.now += 10  # 10 s after the first send: 40,000 more rows sent, 4,000 rows/s, 250,000 left
    show(ProgressEvent("vip", "meta", "sending", 50_000, 300_000))
    assert lines[1] == "sending vip -> meta: 50,000 of 300,000 rows (17%), 4,000 rows/s, about 1 min 02 s left"
    clock.now += 5
    show(ProgressEvent("vip", "meta", "done", 300_000, 300_000))
    assert lines[2] == "done vip -> meta: 300,000 rows sent in 15 s"


def test_log_lines_with_nothing_known_yet_never_divide_by_zero() -> None:
    clock, lines = FakeClock(), []
    show = LogProgress(lines.append, interval=0.0, clock=clock)
    show(ProgressEvent("vip", "google", "sending", 0, 0))
    assert lines == ["sending vip -> google: 0 of 0 rows, 0 rows/s"]


def test_rich_display_shows_rows_rate_and_totals_on_a_terminal() -> None:
    clock = FakeClock()
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with RichProgress(console, clock=clock) as show:
        show(ProgressEvent("vip", None, "reading", 50_000, None))
        clock.now += 5
        show(ProgressEvent("vip", None, "reading", 100_000, None))
        show(ProgressEvent("vip", "meta", "sending", 20_000, 40_000))
        clock.now += 2
        show(ProgressEvent("vip", "meta", "sending", 40_000, 40_000))
        show(ProgressEvent("vip", "meta", "done", 40_000, 40_000))
        tasks = {t.description: t for t in show.bar.tasks}
        assert tasks["reading vip"].completed == 100_000 and tasks["reading vip"].total is None
        assert tasks["reading vip"].speed == 10_000  # 50,000 rows in 5 s of the fake clock
        assert tasks["sent vip -> meta"].completed == 40_000 and tasks["sent vip -> meta"].finished
        show.bar.refresh()
    out = buf.getvalue()
    assert "reading vip" in out and "100,000" in out and "rows/s" in out
    assert "sent vip -> meta" in out


def test_renderer_is_live_only_on_a_terminal() -> None:
    assert isinstance(renderer(Console(file=io.StringIO(), force_terminal=True)), RichProgress)
    assert isinstance(renderer(Console(file=io.StringIO(), force_terminal=False)), LogProgress)


def test_engine_reports_rows_read_then_rows_sent_of_the_total(harness: Harness) -> None:
    from conftest import person, write_csv

    from connector.engine import Engine, SyncOptions

    write_csv(harness.csv, [person(i) for i in range(25)])
    events: list[ProgressEvent] = []
    with Engine(harness.settings, destination_factory=harness.factory, progress=events.append, batch_rows=10) as engine:
        engine.sync(None, SyncOptions())
    reading = [e for e in events if e.phase == "reading"]
    assert [(e.segment, e.destination, e.done, e.total) for e in reading] == [
        ("vip", None, 10, None), ("vip", None, 20, None), ("vip", None, 25, None)]  # fmt: skip
    for dest in ("meta", "google"):
        sending = [e for e in events if e.destination == dest and e.phase == "sending"]
        assert sending and sending[-1].done == sending[-1].total == 25
        assert [e.phase for e in events if e.destination == dest][-1] == "done"
    assert events.index(reading[-1]) < min(i for i, e in enumerate(events) if e.phase == "sending")
