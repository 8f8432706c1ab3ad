"""`connector` command line: validate, sync, status, runs, serve, worker.

Exit codes: 0 success, 1 a sync failed (or was stopped by a guardrail), 2 bad config or usage (also a
configuration mistake found while syncing, such as a missing secret).
`--json` prints exactly one JSON document on stdout, errors included (``{"error": ..., "error_kind": ...}``);
progress and logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from connector import __version__
from connector.engine import Engine, RunResult, SyncOptions
from connector.errors import ConfigError, ConnectorError, LedgerError, LockHeldError, SourceError
from connector.ledger.journal import ON_PLATFORM, Journal
from connector.locks import Coordinator
from connector.logs import setup_logging
from connector.preflight import problems as preflight_problems
from connector.progress import renderer as progress_renderer
from connector.settings import ConnectorSettings, load_settings

app = typer.Typer(
    name="connector",
    help="Mirror customer segments into Google Customer Match and Meta Custom Audiences.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide enough for the results table when stdout is a pipe or a CI log (rich defaults to 80 columns).
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config file (default ./connector.toml or $CONNECTOR_CONFIG)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logs on stderr")]


def _setup_logging(verbose: bool, fmt: str | None = None) -> None:
    setup_logging(fmt or "text", verbose)


_LABELS = {"config": "config error", "usage": "usage error"}


def _fail(message: str, *, kind: str, code: int, json_out: bool) -> NoReturn:
    """Report an error once: as the JSON document with --json, else one line on stderr."""
    if json_out:
        _emit_json({"error": message, "error_kind": kind})
    else:
        err.print(f"[red]{_LABELS.get(kind, 'error')}:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _error_kind(exc: ConnectorError) -> str:
    for cls, kind in ((ConfigError, "config"), (SourceError, "source"), (LedgerError, "ledger"),
                      (LockHeldError, "locked")):  # fmt: skip
        if isinstance(exc, cls):
            return kind
    return "error"


@contextmanager
def _reported(json_out: bool) -> Iterator[None]:
    """Errors of a command as one JSON document (--json) or one line: config mistakes exit 2, others 1."""
    try:
        yield
    except ConnectorError as exc:
        kind = _error_kind(exc)
        _fail(str(exc), kind=kind, code=2 if kind == "config" else 1, json_out=json_out)


def _load(config: Path | None, json_out: bool = False) -> ConnectorSettings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        _fail(str(exc), kind="config", code=2, json_out=json_out)


_json_emitted = False


def _emit_json(doc: Any) -> None:
    global _json_emitted
    _json_emitted = True
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"connector {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
) -> None:
    """Mirror customer segments into Google Customer Match and Meta Custom Audiences."""


@app.command()
def validate(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Check what a sync needs: the config, credentials, files, sources and their columns (headers only)."""
    settings = _load(config, json_out)
    doc: dict[str, Any] = {
        "config": str(settings.config_path),
        "segments": {
            name: {"destinations": seg.destinations, "mode": seg.mode, "schedule": seg.schedule}
            for name, seg in settings.segments.items()
        },
        "destinations": {
            name: {"type": d.type, "sandbox": d.sandbox} for name, d in settings.destinations.items()
        },
    }
    found = preflight_problems(settings)
    verdict = f"{len(found)} problem(s) in {settings.config_path}: a sync would fail or do less than configured"
    if json_out:
        _emit_json({**doc, "ok": not found, "problems": found,
                    **({"error": verdict, "error_kind": "config"} if found else {})})  # fmt: skip
    elif found:
        for p in found:
            err.print(f"[red]problem:[/red] {p}", highlight=False)
        err.print(verdict, highlight=False)
    else:
        out.print(f"[green]ok[/green] {settings.config_path}: {len(settings.segments)} segment(s), "
                  f"{len(settings.destinations)} destination(s)", highlight=False)  # fmt: skip
        for name, seg in settings.segments.items():
            source = f"sources.{seg.source}" if isinstance(seg.source, str) else seg.source.type
            picks = f" where {seg.where}" if seg.where else ""
            picks += f" tier {seg.tier.name} by {seg.tiers.by}" if seg.tier and seg.tiers else ""
            out.print(f"  segment {name}: {source}{picks} -> {', '.join(seg.destinations)} ({seg.mode})",
                      highlight=False, markup=False)  # fmt: skip
    if found:
        raise typer.Exit(2)


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


# a column: (header, kind); "number" is right-aligned, "id" (audience ids...) is never wrapped
Column = tuple[str, Literal["text", "number", "id"]]


def show_table(console: Console, title: str, columns: list[Column], rows: list[list[str]], *, key: int = 2) -> None:
    """A table when it fits the console; otherwise one block per row, so no cell is ever cut ("…").

    In a block the first `key` cells make its heading, the others follow as "header value".
    """
    t = Table(title=title)
    for name, kind in columns:
        if kind == "id":
            width = max([len(name), *(len(Text.from_markup(r[len(t.columns)]).plain) for r in rows)])
            t.add_column(name, no_wrap=True, min_width=width)
        else:
            t.add_column(name, justify="right" if kind == "number" else "left")
    for row in rows:
        t.add_row(*row)
    if Measurement.get(console, console.options.update_width(100_000), t).maximum <= console.width:
        console.print(t)
        return
    console.print(Text(title, style="italic"))
    for row in rows:
        console.print(Text(" ".join(Text.from_markup(c).plain for c in row[:key]), style="bold"), soft_wrap=False)
        cells = "  ".join(f"{name} {cell}" for (name, _), cell in zip(columns[key:], row[key:], strict=True))
        # wrapped between words (never cropped, even on a soft-wrapping console): numbers and ids stay whole
        console.print(Padding(cells, (0, 0, 0, 2), expand=False), highlight=False, soft_wrap=False)


RESULT_COLUMNS: list[Column] = [
    ("segment", "text"), ("destination", "text"), ("status", "text"), ("rows", "number"), ("invalid", "number"),
    ("adds", "number"), ("removes", "number"), ("unchanged", "number"), ("rejected", "number"), ("calls", "number"),
    ("audience", "id"),
]  # fmt: skip


def show_results(console: Console, results: list[RunResult], dry_run: bool) -> None:
    rows = []
    for r in results:
        d = r.as_dict()
        status = r.status + (" (sandbox)" if r.sandbox else "") + (" [replace]" if r.full_refresh else "")
        color = {"success": "green", "dry_run": "cyan", "warning": "yellow"}.get(r.status, "red")
        rows.append([
            escape(r.segment), escape(r.destination), f"[{color}]{escape(status)}[/{color}]", _n(d["source_rows"]),
            _n(d["invalid"]), _n(d["adds"]), _n(d["removes"]), _n(d["unchanged"]), _n(r.rejected), _n(r.write_calls),
            r.audience_id or "-",
        ])  # fmt: skip
    show_table(console, "plan (dry run: nothing sent)" if dry_run else "sync results", RESULT_COLUMNS, rows)


def _clv_line(clv: dict[str, Any]) -> str:
    skipped = sum(clv["skipped_orders"].values())
    mean = "-" if clv["mean_value"] is None else f"{clv['mean_value']:,.2f}"
    fit = "values of the last fit (same orders)" if clv.get("cached") else f"fit {clv['fit_seconds']:.1f} s"
    return (f"predicted value ({clv['horizon_days']} days) on {clv['source']} from {clv['orders_source']}: "
            f"{clv['customers']:,} customers, {clv['repeat_share']:.0%} repeat, mean {mean}, "
            f"{clv['matched_customers']:,} rows matched, {clv['orders']:,} orders"
            f"{f' ({skipped:,} skipped)' if skipped else ''}, {fit}")  # fmt: skip


class _ShownAtTheEnd(logging.Filter):
    """The engine logs a failed run's error; `sync` prints it once under the results instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "connector.engine" and record.levelno >= logging.ERROR)


def _check_selection(settings: ConnectorSettings, segments: list[str] | None, destinations: list[str] | None,
                     json_out: bool) -> None:  # fmt: skip
    """Unknown segments, and destinations that are not the chosen segments' own, are usage errors."""
    tiered = {s.tier.segment for s in settings.segments.values() if s.tier}
    unknown = [s for s in segments or [] if s not in settings.segments and s not in tiered]
    if unknown:
        known = ", ".join([*settings.segments, *sorted(tiered)]) or "none"
        _fail(f"unknown segment(s): {', '.join(unknown)} (configured: {known})", kind="usage", code=2, json_out=json_out)
    if not destinations:
        return
    chosen = settings.segment_names(segments)
    for seg in chosen:
        own = settings.segments[seg].destinations
        if segments and not any(d in own for d in destinations):
            _fail(f"segment {seg} has no destination {', '.join(destinations)}; its destinations: {', '.join(own)}",
                  kind="usage", code=2, json_out=json_out)  # fmt: skip
    reachable = {d for seg in chosen for d in settings.segments[seg].destinations}
    stray = [d for d in destinations if d not in reachable]
    if stray:
        where = f"segment(s) {', '.join(chosen)}" if segments else "any segment"
        listing = "; ".join(f"{s}: {', '.join(settings.segments[s].destinations)}" for s in chosen) or "no segments"
        _fail(f"destination(s) {', '.join(stray)} not used by {where} (destinations: {listing})",
              kind="usage", code=2, json_out=json_out)  # fmt: skip


@app.command()
def sync(
    segments: Annotated[list[str] | None, typer.Argument(help="segments to sync (default: all)")] = None,
    config: ConfigOpt = None,
    destination: Annotated[list[str] | None, typer.Option("--destination", "-d", help="only this destination")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan and show, send nothing")] = False,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="replace whole audiences")] = False,
    force: Annotated[bool, typer.Option("--force", help="override the removal guardrails")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="exit 1 if another process syncs a pair now")] = False,
    log_format: Annotated[str | None, typer.Option("--log-format", help="text or json")] = None,
) -> None:
    """Sync segments to their destinations (adds and removes only what changed)."""
    settings = _load(config, json_out)
    _setup_logging(verbose, log_format or settings.log_format)
    _check_selection(settings, segments, destination, json_out)
    opts = SyncOptions(
        dry_run=dry_run, full_refresh=full_refresh, force=force, trigger="manual",
        destinations=frozenset(destination) if destination else None,
    )  # fmt: skip
    if not json_out:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_ShownAtTheEnd())

    def waiting(segment: str, dest: str, holder: str) -> None:
        err.print(f"waiting: {segment} -> {dest} is being synced by {holder}", highlight=False)

    with _reported(json_out):
        ledger = Journal(settings.ledger_sqlalchemy_url())
        try:
            lock = Coordinator(ledger).pair_lock(wait=not no_wait, on_wait=waiting)
            with progress_renderer(err) as progress, \
                    Engine(settings, ledger=ledger, progress=progress, pair_lock=lock) as engine:  # type: ignore[arg-type]
                results = engine.sync(segments, opts)
        finally:
            ledger.close()
    failed = [r for r in results if r.status in ("failed", "stopped")]
    if json_out:
        _emit_json({"dry_run": dry_run, "runs": [r.as_dict() for r in results]})
    else:
        if any(r.sandbox for r in results):
            out.print("[yellow]note:[/yellow] sandbox destinations: members went to the bundled emulators, "
                      "not to a real ad account")  # fmt: skip
        show_results(out, results, dry_run)
        for line in dict.fromkeys(f"  {_clv_line(r.clv)}" for r in results if r.clv):
            out.print(line, highlight=False, markup=False)
        for r in results:
            pair = f"{r.segment} -> {r.destination}"
            if r.counts.invalid_reasons:
                reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(r.counts.invalid_reasons.items()))
                out.print(f"  {pair}: identifier problems: {reasons}", highlight=False)
            if r.counts.value_reasons:
                reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(r.counts.value_reasons.items()))
                what = "not sent" if r.platform == "meta" else "sent without a value"
                out.print(f"  {pair}: value problems ({what}, or kept at the value last sent): {reasons}",
                          highlight=False)  # fmt: skip
            for note in r.notes:
                out.print(f"  [yellow]note[/yellow] {pair}: {note}", highlight=False)
            if r.counts.consent_denied:
                out.print(f"  {pair}: {r.counts.consent_denied:,} members not sent (ad_user_data consent denied)",
                          highlight=False)  # fmt: skip
            if r.tier and r.destination == next(x.destination for x in results if x.segment == r.segment):
                out.print(f"  {r.segment}: tier {r.tier['name']} by {r.tier['by']}: {r.tier['members']:,} of "
                          f"{r.tier['of_rows']:,} rows ({r.tier['rows_without_value']:,} without a value, in the last tier)",
                          highlight=False, markup=False)  # fmt: skip
            if r.lookalike_id or r.lookalike_state:
                out.print(f"  {pair}: lookalike {r.lookalike_id or '-'} ({r.lookalike_state})", highlight=False)
            if r.warning:
                out.print(f"  [yellow]warning[/yellow] {pair}: {r.warning}", highlight=False)
        # a segment that failed fails each of its pairs with the same error: print it once
        for status, error in dict.fromkeys((r.status, r.error) for r in failed):
            err.print(f"[red]{status}:[/red] {error}", highlight=False)
    if any(r.error_kind == "config" for r in failed):
        raise typer.Exit(2)  # a configuration mistake (a missing secret...): fix the config, not the data
    if failed:
        raise typer.Exit(1)


@app.command()
def status(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Per segment and destination: audience, members in the ledger, last success, lookalike; with [workers],
    the job queue (syncs queued, running, or waiting for a retry)."""
    settings = _load(config, json_out)
    with _reported(json_out):
        pairs = _status(settings)
        jobs = _job_queue(settings)
    if json_out:
        _emit_json({"pairs": pairs, **({"jobs": jobs} if jobs is not None else {})})
        return
    rows = []
    for p in pairs:
        st = p["platform_status"] or {}
        lo, hi = st.get("size_lower"), st.get("size_upper")
        size = "-" if lo is None else (_n(lo) if lo == hi else f"{_n(lo)}-{_n(hi)}")
        mr = st.get("match_rate")
        rows.append([
            escape(p["segment"]), escape(p["destination"]) + (" (sandbox)" if p["sandbox"] else ""), p["audience_id"] or "-",
            _n(p["members_on_platform"]), size, "-" if mr is None else f"{mr:.0f}%", str(st.get("state", "-")),
            p["last_success"] or "never", _lookalike(p),
        ])  # fmt: skip
    show_table(out, "status", STATUS_COLUMNS, rows)
    _show_jobs(jobs)


STATUS_COLUMNS: list[Column] = [
    ("segment", "text"), ("destination", "text"), ("audience", "id"), ("in ledger", "number"),
    ("platform size", "number"), ("match rate", "number"), ("platform state", "text"), ("last success", "text"),
    ("lookalike", "id"),
]  # fmt: skip


def _lookalike(p: dict[str, Any]) -> str:
    return f"{p['lookalike_id']} ({p['lookalike_state']})" if p["lookalike_id"] else "-"


def _status(settings: ConnectorSettings) -> list[dict[str, Any]]:
    ledger = Journal(settings.ledger_sqlalchemy_url())
    try:
        pairs: list[dict[str, Any]] = []
        for seg_name, seg in settings.segments.items():
            for dest in seg.destinations:
                rec = ledger.get_audience(seg_name, dest)
                counts = ledger.counts(seg_name, dest)
                last = ledger.last_success(seg_name, dest)
                next_run = _next_run(seg.schedule, settings.timezone)
                pairs.append({
                    "segment": seg_name, "destination": dest,
                    "platform": settings.destinations[dest].type,
                    "sandbox": settings.destinations[dest].sandbox,
                    "audience_id": rec.audience_id if rec else None,
                    "audience_name": rec.name if rec else None,
                    "members_on_platform": sum(counts.get(s, 0) for s in ON_PLATFORM),
                    "members_by_state": counts,
                    "last_success": last.isoformat() if last else None,
                    "next_scheduled_run": next_run,
                    "platform_status": rec.last_status if rec else {},
                    "platform_status_read_at": rec.last_status_at.isoformat() if rec and rec.last_status_at else None,
                    "lookalike_id": rec.lookalike_id if rec else None,
                    "lookalike_state": rec.lookalike_state if rec else None,
                    "last_replace_at": rec.last_replace_at.isoformat() if rec and rec.last_replace_at else None,
                })  # fmt: skip
    finally:
        ledger.close()
    return pairs


def _job_queue(settings: ConnectorSettings) -> list[dict[str, Any]] | None:
    """With [workers]: the sync jobs queued, running or waiting for a retry (procrastinate's job table)."""
    if settings.workers is None:
        return None
    try:
        from connector.jobs import read_queue
    except ImportError as exc:
        raise ConfigError(f"reading the job queue needs the workers extra: pip install 'connector[workers]' "
                          f"({exc.name} is missing)") from None  # fmt: skip
    ledger = Journal(settings.ledger_sqlalchemy_url())
    try:
        return [j.as_dict() for j in read_queue(settings, ledger)]
    finally:
        ledger.close()


JOB_COLUMNS: list[Column] = [
    ("job", "number"), ("segment", "text"), ("destinations", "text"), ("trigger", "text"), ("state", "text"),
    ("attempt", "text"), ("queued at", "text"), ("due / started", "text"), ("worker", "text"),
]  # fmt: skip


def _show_jobs(jobs: list[dict[str, Any]] | None) -> None:
    if jobs is None:
        return
    if not jobs:
        out.print("job queue: empty (no sync queued or running)", highlight=False)
        return
    color = {"queued": "cyan", "running": "green", "retrying": "yellow"}
    rows = [
        [str(j["job_id"]), escape(j["segment"]), escape(", ".join(j["destinations"]) if j["destinations"] else "all"),
         j["trigger"], f"[{color[j['state']]}]{j['state']}[/{color[j['state']]}]", f"{j['attempt']}/{j['max_attempts']}",
         (j["queued_at"] or "-")[:19], (j["started_at"] or j["due_at"] or "-")[:19],
         escape(j["worker"] or (f"worker id {j['worker_id']}" if j["worker_id"] is not None else "-"))]
        for j in jobs
    ]  # fmt: skip
    show_table(out, "job queue (UTC)", JOB_COLUMNS, rows)


def _next_run(schedule: str | None, tz: str) -> str | None:
    if not schedule:
        return None
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from croniter import croniter

    return str(croniter(schedule, datetime.now(ZoneInfo(tz))).get_next(datetime).isoformat())


@app.command()
def runs(
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", "-n", help="how many recent runs")] = 20,
) -> None:
    """Recent runs: trigger, pair, timing, status, counts, error; with [workers], the job queue."""
    settings = _load(config, json_out)
    with _reported(json_out):
        ledger = Journal(settings.ledger_sqlalchemy_url())
        try:
            records = ledger.list_runs(limit)
        finally:
            ledger.close()
        jobs = _job_queue(settings)
    docs: list[dict[str, Any]] = [
        {
            "id": r.id, "trigger": r.trigger, "segment": r.segment, "destination": r.destination,
            "started_at": r.started_at.isoformat(), "ended_at": r.ended_at.isoformat() if r.ended_at else None,
            "status": r.status, "dry_run": r.dry_run, "counts": r.counts, "error": r.error,
        }
        for r in records
    ]
    if json_out:
        _emit_json({"runs": docs, **({"jobs": jobs} if jobs is not None else {})})
        return
    rows = [
        [str(d["id"]), d["trigger"], escape(d["segment"]), escape(d["destination"]), d["started_at"][:19],
         d["status"] + (" (dry run)" if d["dry_run"] else ""), _n(d["counts"].get("adds", "-")),
         _n(d["counts"].get("removes", "-")), escape((d["error"] or "")[:80])]
        for d in docs
    ]  # fmt: skip
    columns: list[Column] = [("id", "number"), ("trigger", "text"), ("segment", "text"), ("destination", "text"),
                             ("started", "text"), ("status", "text"), ("adds", "number"), ("removes", "number"),
                             ("error", "text")]  # fmt: skip
    show_table(out, "recent runs", columns, rows, key=1)
    _show_jobs(jobs)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8787,
    jitter: Annotated[float, typer.Option("--jitter", help="random delay (seconds) added to scheduled runs")] = 0.0,
    log_format: Annotated[str | None, typer.Option("--log-format", help="text or json")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run scheduled syncs and accept signed webhooks (POST /webhooks/segments/NAME)."""
    settings = _load(config)
    _setup_logging(verbose, log_format or settings.log_format)
    from connector.server import serve as run_server

    err.print(f"connector serving on http://{host}:{port} (webhooks, /runs, /metrics, /healthz)", highlight=False)
    run_server(settings, host, port, jitter)


@app.command()
def worker(
    config: ConfigOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="worker name in its log lines")] = None,
    log_format: Annotated[str | None, typer.Option("--log-format", help="text or json")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run queued and scheduled syncs from the job queue ([workers] in the config); any number, any machine.
    SIGTERM finishes the batch in flight and puts the rest of the sync back in the queue."""
    settings = _load(config)
    _setup_logging(verbose, log_format or settings.log_format)
    if settings.workers is None:
        _fail("`connector worker` needs a [workers] table with url = \"postgresql://...\" (see docs/scaling.md)",
              kind="config", code=2, json_out=False)  # fmt: skip
    try:
        from connector.jobs import run_worker
    except ImportError as exc:
        _fail(f"`connector worker` needs the workers extra: pip install 'connector[workers]' ({exc.name} is missing)",
              kind="config", code=2, json_out=False)  # fmt: skip
    with _reported(False):
        run_worker(settings, name=name)


def main(argv: list[str] | None = None) -> None:
    """The `connector` entry point. With --json, even a usage error or a crash leaves one JSON document."""
    global _json_emitted
    _json_emitted = False
    args = sys.argv[1:] if argv is None else argv
    if "--json" not in args:
        app(args=args, prog_name="connector")
        return
    try:
        code = typer.main.get_command(app).main(args=args, prog_name="connector", standalone_mode=False)
    except typer.Abort:
        code = 130
        if not _json_emitted:
            _emit_json({"error": "aborted", "error_kind": "interrupted"})
    except Exception as exc:
        if _json_emitted:
            raise
        message, exit_code = getattr(exc, "format_message", None), getattr(exc, "exit_code", None)
        if callable(message) and isinstance(exit_code, int):  # click's usage errors (bad option, missing value...)
            _emit_json({"error": str(message()), "error_kind": "usage" if exit_code == 2 else "error"})
            sys.exit(exit_code)
        # the traceback goes to stderr; its text may hold data, the JSON document only the type
        _emit_json({"error": f"internal error ({type(exc).__name__}); the traceback is on stderr",
                    "error_kind": "internal"})  # fmt: skip
        raise
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    main()
