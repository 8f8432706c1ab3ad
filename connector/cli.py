"""`connector` command line: validate, sync, status, runs.

Exit codes: 0 success, 1 a sync failed (or was stopped by a guardrail), 2 bad config or usage (also a
configuration mistake found while syncing, such as a missing secret).
`--json` prints exactly one JSON document on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from connector.engine import Engine, RunResult, SyncOptions
from connector.errors import ConfigError, ConnectorError
from connector.ledger.journal import ON_PLATFORM, Journal
from connector.locks import Coordinator
from connector.logs import setup_logging
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


def _load(config: Path | None) -> ConnectorSettings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.command()
def validate(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Check the config file and environment; print what would be synced."""
    settings = _load(config)
    doc = {
        "config": str(settings.config_path),
        "segments": {
            name: {"destinations": seg.destinations, "mode": seg.mode, "schedule": seg.schedule}
            for name, seg in settings.segments.items()
        },
        "destinations": {
            name: {"type": d.type, "sandbox": d.sandbox} for name, d in settings.destinations.items()
        },
    }
    missing = [
        f"destinations.{name}: no credentials (set {_token_env(name, d.type)} or use sandbox = true)"
        for name, d in settings.destinations.items()
        if not d.sandbox and not _has_credentials(d)
    ]
    if json_out:
        _emit_json({**doc, "ok": not missing, "problems": missing})
    else:
        out.print(f"[green]ok[/green] {settings.config_path}: {len(settings.segments)} segment(s), "
                  f"{len(settings.destinations)} destination(s)")  # fmt: skip
        for name, seg in settings.segments.items():
            out.print(f"  segment {name}: {seg.source.type} -> {', '.join(seg.destinations)} ({seg.mode})")
        for p in missing:
            err.print(f"[red]problem:[/red] {p}")
    if missing:
        raise typer.Exit(2)


def _token_env(name: str, kind: str) -> str:
    field = "ACCESS_TOKEN" if kind == "meta" else "OAUTH_REFRESH_TOKEN"
    return f"CONNECTOR_DESTINATIONS__{name.upper()}__{field}"


def _has_credentials(d: Any) -> bool:
    if d.type == "meta":
        return d.access_token is not None
    return d.service_account_file is not None or d.oauth_refresh_token is not None


def _results_table(results: list[RunResult], dry_run: bool) -> Table:
    t = Table(title="plan (dry run: nothing sent)" if dry_run else "sync results")
    for col in ("segment", "destination", "status", "rows", "invalid", "adds", "removes", "unchanged",
                "rejected", "calls", "audience"):  # fmt: skip
        t.add_column(col, justify="right" if col not in ("segment", "destination", "status", "audience") else "left")
    for r in results:
        d = r.as_dict()
        status = r.status + (" (sandbox)" if r.sandbox else "") + (" [replace]" if r.full_refresh else "")
        color = {"success": "green", "dry_run": "cyan", "warning": "yellow"}.get(r.status, "red")
        t.add_row(
            r.segment, r.destination, f"[{color}]{status}[/{color}]", str(d["source_rows"]), str(d["invalid"]),
            str(d["adds"]), str(d["removes"]), str(d["unchanged"]), str(r.rejected), str(r.write_calls),
            r.audience_id or "-",
        )  # fmt: skip
    return t


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
    settings = _load(config)
    _setup_logging(verbose, log_format or settings.log_format)
    if destination:
        unknown = [d for d in destination if d not in settings.destinations]
        if unknown:
            err.print(f"[red]usage error:[/red] unknown destination(s): {', '.join(unknown)}")
            raise typer.Exit(2)
    opts = SyncOptions(
        dry_run=dry_run, full_refresh=full_refresh, force=force, trigger="manual",
        destinations=frozenset(destination) if destination else None,
    )  # fmt: skip
    progress = _progress_printer() if sys.stderr.isatty() else None

    def waiting(segment: str, dest: str, holder: str) -> None:
        err.print(f"waiting: {segment} -> {dest} is being synced by {holder}", highlight=False)

    try:
        ledger = Journal(settings.ledger_sqlalchemy_url())
        lock = Coordinator(ledger).pair_lock(wait=not no_wait, on_wait=waiting)
        with Engine(settings, ledger=ledger, progress=progress, pair_lock=lock) as engine:  # type: ignore[arg-type]
            results = engine.sync(segments, opts)
        ledger.close()
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except ConnectorError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    failed = [r for r in results if r.status in ("failed", "stopped")]
    if json_out:
        _emit_json({"dry_run": dry_run, "runs": [r.as_dict() for r in results]})
    else:
        if any(r.sandbox for r in results):
            out.print("[yellow]note:[/yellow] sandbox destinations: members went to the bundled emulators, "
                      "not to a real ad account")  # fmt: skip
        out.print(_results_table(results, dry_run))
        for r in results:
            if r.counts.invalid_reasons:
                reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.invalid_reasons.items()))
                out.print(f"  {r.segment} -> {r.destination}: identifier problems: {reasons}")
            if r.counts.consent_denied:
                out.print(f"  {r.segment} -> {r.destination}: {r.counts.consent_denied} members not sent "
                          "(ad_user_data consent denied)")  # fmt: skip
            if r.lookalike_id or r.lookalike_state:
                out.print(f"  {r.segment} -> {r.destination}: lookalike {r.lookalike_id or '-'} ({r.lookalike_state})")
            if r.warning:
                out.print(f"  [yellow]warning[/yellow] {r.segment} -> {r.destination}: {r.warning}")
        for r in failed:
            err.print(f"[red]{r.status}:[/red] {r.error}", highlight=False)
    if any(r.error_kind == "config" for r in failed):
        raise typer.Exit(2)  # a configuration mistake (a missing secret...): fix the config, not the data
    if failed:
        raise typer.Exit(1)


def _progress_printer() -> Any:
    last: dict[str, int] = {}

    def show(segment: str, rows: int) -> None:
        if rows - last.get(segment, 0) >= 200_000:
            last[segment] = rows
            err.print(f"  reading {segment}: {rows:,} rows", highlight=False)

    return show


@app.command()
def status(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Per segment and destination: audience, members in the ledger, last success, lookalike."""
    settings = _load(config)
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
    if json_out:
        _emit_json({"pairs": pairs})
        return
    t = Table(title="status")
    for col in ("segment", "destination", "audience", "in ledger", "platform size", "match rate",
                "platform state", "last success", "lookalike"):  # fmt: skip
        t.add_column(col)
    for p in pairs:
        st = p["platform_status"] or {}
        lo, hi = st.get("size_lower"), st.get("size_upper")
        size = "-" if lo is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")
        mr = st.get("match_rate")
        t.add_row(
            p["segment"], p["destination"] + (" (sandbox)" if p["sandbox"] else ""), p["audience_id"] or "-",
            str(p["members_on_platform"]), size, "-" if mr is None else f"{mr:.0f}%", str(st.get("state", "-")),
            p["last_success"] or "never", f"{p['lookalike_id']} ({p['lookalike_state']})" if p["lookalike_id"] else "-",
        )  # fmt: skip
    out.print(t)


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
    """Recent runs: trigger, pair, timing, status, counts, error."""
    settings = _load(config)
    ledger = Journal(settings.ledger_sqlalchemy_url())
    try:
        records = ledger.list_runs(limit)
    finally:
        ledger.close()
    docs: list[dict[str, Any]] = [
        {
            "id": r.id, "trigger": r.trigger, "segment": r.segment, "destination": r.destination,
            "started_at": r.started_at.isoformat(), "ended_at": r.ended_at.isoformat() if r.ended_at else None,
            "status": r.status, "dry_run": r.dry_run, "counts": r.counts, "error": r.error,
        }
        for r in records
    ]
    if json_out:
        _emit_json({"runs": docs})
        return
    t = Table(title="recent runs")
    for col in ("id", "trigger", "segment", "destination", "started", "status", "adds", "removes", "error"):
        t.add_column(col)
    for d in docs:
        c = d["counts"]
        t.add_row(
            str(d["id"]), d["trigger"], d["segment"], d["destination"], d["started_at"][:19],
            d["status"] + (" (dry run)" if d["dry_run"] else ""), str(c.get("adds", "-")),
            str(c.get("removes", "-")), (d["error"] or "")[:80],
        )  # fmt: skip
    out.print(t)


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


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        # click uses exit code 2 for usage errors already; keep ours as they are
        raise exc


if __name__ == "__main__":
    main()
