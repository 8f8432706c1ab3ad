"""One sync of a segment: lease -> recover -> read -> plan -> write-ahead -> push -> finish.

For each (segment, destination) pair, in this order:

1. the pair's lock is held (`pair_lock`), earlier Google requests are polled, the audience is made sure
   of (a recreated audience starts the pair over from an empty ledger);
2. the source is read once for all of the segment's pairs and each pair is planned (`connector.diff`):
   its new member file (base, or cumulative delta) is written and fsynced before anything is sent;
3. guardrails, dry run;
4. one transaction moves the pair's pointer to that file: the write-ahead point;
5. removals, then additions (`connector.sending`), each pair on a thread of its own (a segment's
   destinations are sent to at once); each acknowledged call is one journal row, so a crash re-sends at
   most the batch in flight of each pair;
6. requests are polled again (`connector.audiences`), a large delta is compacted into a new base,
   unreferenced files go, counts are recorded (`connector.ledger.recovery.settle`), the lookalike is made
   sure of and the audience status read (`connector.audiences`).

Removals go before additions so that a member whose identifiers changed (old payload removed, new
payload added) never loses an identifier the two payloads share.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb

from connector.audiences import ensure_lookalike, reconcile, record_status
from connector.destinations import build_destination, value_support
from connector.destinations.base import (
    AudienceRef,
    Destination,
    ValueSupport,
)
from connector.diff import BATCH_ROWS, PairInput, PairPlan, PlanCounts, Planner, SegmentSpec, check_guardrails
from connector.errors import (
    ConfigError,
    ConnectorError,
    DestinationError,
    FatalError,
    GuardrailError,
    QuotaExhaustedError,
    SourceError,
)
from connector.identifiers.normalize import Normalizer
from connector.ledger.files import PairFiles, member_root, member_schema, members_fingerprinted
from connector.ledger.journal import Journal, PairPointer, now
from connector.ledger.recovery import ACCEPTED, current_sql, register_journal, settle
from connector.logs import log_context
from connector.progress import Progress, ProgressEvent
from connector.retry import RetryStats
from connector.segments import SegmentSources, source_header
from connector.sending import Sender
from connector.settings import (
    TIER_COLUMN,
    ConnectorSettings,
    DestinationConfig,
    GoogleDestinationConfig,
    MetaDestinationConfig,
    SegmentConfig,
)

log = logging.getLogger("connector.engine")

DestinationFactory = Callable[[str, DestinationConfig, Path, RetryStats], Destination]
# (segment, destination) -> a context manager held while the pair is planned and pushed
PairLock = Callable[[str, str], AbstractContextManager[object]]

class Interrupted(ConnectorError):
    """Shutdown was requested: the batch in flight was committed, the rest waits for the next run."""


@dataclass(slots=True)
class SyncOptions:
    dry_run: bool = False
    full_refresh: bool = False
    force: bool = False
    trigger: str = "manual"
    destinations: frozenset[str] | None = None  # only these destination names
    run_ids: dict[str, int] | None = None  # runs created when the trigger was queued (server)


@dataclass(slots=True)
class RunResult:
    segment: str
    destination: str
    platform: str
    status: str  # success | failed | stopped | dry_run | warning | interrupted
    counts: PlanCounts = field(default_factory=PlanCounts)
    run_id: int | None = None
    sandbox: bool = False
    audience_id: str | None = None
    audience_recreated: bool = False
    lookalike_id: str | None = None
    lookalike_state: str | None = None
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    deferred: int = 0
    write_calls: int = 0
    full_refresh: bool = False
    error: str | None = None
    error_kind: str | None = None  # "config" when the run failed on a configuration mistake
    warning: str | None = None
    notes: list[str] = field(default_factory=list)  # said once in the run's output, not a failure
    retries: int = 0
    throttle_wait_seconds: float = 0.0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # wall-clock seconds by phase
    clv: dict[str, Any] | None = None  # the predicted-value fit of the segment's source (`ClvSummary.as_dict`)
    tier: dict[str, Any] | None = None  # a tier segment: its tier, members, rows ranked, rows without a value

    def as_dict(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "destination": self.destination,
            "platform": self.platform,
            "status": self.status,
            "sandbox": self.sandbox,
            **self.counts.as_dict(),
            "rejected": self.rejected,
            "rejected_reasons": self.rejected_reasons,
            "deferred": self.deferred,
            "write_calls": self.write_calls,
            "full_refresh": self.full_refresh,
            "audience_id": self.audience_id,
            "audience_recreated": self.audience_recreated,
            "lookalike_id": self.lookalike_id,
            "lookalike_state": self.lookalike_state,
            "retries": self.retries,
            "throttle_wait_seconds": round(self.throttle_wait_seconds, 3),
            "seconds": round(self.seconds, 3),
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "run_id": self.run_id,
            "error": self.error,
            "error_kind": self.error_kind,
            "warning": self.warning,
            "notes": list(self.notes),
            "clv": self.clv,
            "tier": self.tier,
        }


@dataclass(slots=True)
class _Pair:
    """A pair while its segment is synced."""

    name: str
    config: DestinationConfig
    platform: str
    run_id: int
    result: RunResult
    payload_keys: tuple[str, ...] = ()
    files: PairFiles | None = None
    pointer: PairPointer = field(default_factory=PairPointer)
    audience: AudienceRef | None = None
    plan: PairPlan | None = None
    values: ValueSupport = field(default_factory=lambda: ValueSupport("none"))
    path: Path | None = None  # its file to send, once the pointer names it (None: nothing to send)


class Engine:
    """Runs syncs for one settings object and one ledger. Not thread-safe: one per worker."""

    def __init__(
        self,
        settings: ConnectorSettings,
        ledger: Journal | None = None,
        destination_factory: DestinationFactory | None = None,
        progress: Progress | None = None,
        pair_lock: PairLock | None = None,
        stop: threading.Event | None = None,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self.settings = settings
        self._batch_rows = batch_rows  # source rows planned (and reported) together
        self._pair_lock = pair_lock
        self.stop = stop or threading.Event()
        self._abort = threading.Event()  # another pair's sending failed unexpectedly: stop sending too
        self.ledger = ledger or Journal(settings.ledger_sqlalchemy_url())
        self._own_ledger = ledger is None
        self._factory = destination_factory or (
            lambda name, cfg, state_dir, stats: build_destination(name, cfg, state_dir, stats)
        )
        self._progress = _serialized(progress) if progress is not None else None
        self._destinations: dict[str, Destination] = {}
        self.stats: dict[str, RetryStats] = {}
        self.files_root = member_root(settings)
        self._sources: SegmentSources | None = None
        if self.ledger.legacy_schema is not None:
            from connector.ledger.migrate import migrate_legacy

            migrate_legacy(self.ledger, self.files_root)

    # ------------------------------------------------------------------ lifecycle

    def destination(self, name: str) -> Destination:
        if name not in self._destinations:
            stats = self.stats.setdefault(name, RetryStats())
            self._destinations[name] = self._factory(name, self.settings.destinations[name], self.settings.state_path, stats)
        return self._destinations[name]

    def close(self) -> None:
        for d in self._destinations.values():
            try:
                d.close()
            except Exception:  # noqa: BLE001 - closing must not hide the run's own outcome
                log.warning("closing destination %s failed", d.name)
        self._destinations.clear()
        if self._own_ledger:
            self.ledger.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _duckdb(self) -> duckdb.DuckDBPyConnection:
        tmp = self.settings.state_path / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "threads": self.settings.threads or os.cpu_count() or 1,
            "memory_limit": self.settings.memory_limit,
            "temp_directory": str(tmp),
        }
        con = duckdb.connect(config=config)
        # DuckDB draws a progress bar on stdout for a query past 2 s: stdout is the --json document's
        con.execute("SET enable_progress_bar = false")
        return con

    # ------------------------------------------------------------------ public

    def sync(self, segments: Sequence[str] | None = None, options: SyncOptions | None = None) -> list[RunResult]:
        """Sync the segments (default: all; a tiered segment's name stands for its tiers). Each source
        is read once for all of them."""
        opts = options or SyncOptions()
        known = set(self.settings.segments) | {s.tier.segment for s in self.settings.segments.values() if s.tier}
        unknown = [n for n in segments or [] if n not in known]
        if unknown:
            raise ConfigError(
                f"unknown segment(s): {', '.join(unknown)} (configured: {', '.join(self.settings.segments) or 'none'})"
            )
        results: list[RunResult] = []
        with self._reading():
            for name in self.settings.segment_names(segments):
                results.extend(self.sync_segment(name, opts))
        return results

    @contextmanager
    def _reading(self) -> Iterator[SegmentSources]:
        """The sources of this sync call: read at most once, dropped when the call ends."""
        if self._sources is not None:
            yield self._sources
            return
        self._sources = SegmentSources(self.settings, self._duckdb())
        try:
            yield self._sources
        finally:
            self._sources.close()
            self._sources = None

    def sync_segment(self, name: str, opts: SyncOptions) -> list[RunResult]:
        seg = self.settings.segments[name]
        dest_names = [d for d in seg.destinations if opts.destinations is None or d in opts.destinations]
        if not dest_names:
            return []
        with ExitStack() as locks, self._reading() as sources:
            if self._pair_lock is not None:
                # sorted: two processes locking the same pairs never deadlock
                for d in sorted(dest_names):
                    locks.enter_context(self._pair_lock(name, d))
            con = sources.db.cursor()  # the segment's own temporary tables, the sync's source tables
            try:
                return self._sync_locked(con, name, seg, dest_names, opts)
            finally:
                con.close()

    # ------------------------------------------------------------------ one segment

    def _sync_locked(self, con: duckdb.DuckDBPyConnection, name: str, seg: SegmentConfig, dest_names: list[str],
                     opts: SyncOptions) -> list[RunResult]:  # fmt: skip
        started = time.monotonic()
        pairs: list[_Pair] = []
        for d in dest_names:
            cfg = self.settings.destinations[d]
            if opts.run_ids and d in opts.run_ids:
                run_id = opts.run_ids[d]
                self.ledger.mark_running(run_id)
            else:
                run_id = self.ledger.start_run(opts.trigger, name, d, opts.dry_run)
            res = RunResult(name, d, cfg.type, "success", run_id=run_id, sandbox=cfg.sandbox)
            pairs.append(_Pair(d, cfg, cfg.type, run_id, res))
        active: list[_Pair] = []
        for pair in pairs:
            with log_context(run_id=str(pair.run_id), segment=name, destination=pair.name):
                if self._guard(pair, lambda p=pair: self._open_pair(con, name, seg, p, opts)):  # type: ignore[misc]
                    active.append(pair)
        if active:
            try:
                t0 = time.monotonic()
                self._plan(con, name, seg, active, opts)
                for pair in active:
                    pair.result.phases["planning"] = time.monotonic() - t0
            except ConnectorError as exc:
                log.error("segment %s failed: %s", name, exc)
                for pair in active:
                    self._fail(pair.result, f"segment {name}: {exc}", exc)
                active = []
        before = {p.name: (s.retries, s.throttle_wait_seconds) for p in active
                  for s in [self.stats.setdefault(p.name, RetryStats())]}  # fmt: skip
        ready = [p for p in active if self._step(name, p, lambda p=p: self._write_ahead(name, seg, p, opts))]  # type: ignore[misc]
        if not opts.dry_run:
            self._send_all(con, name, seg, ready)
        for pair in active:
            stats = self.stats[pair.name]
            pair.result.retries = stats.retries - before[pair.name][0]
            pair.result.throttle_wait_seconds = stats.throttle_wait_seconds - before[pair.name][1]
        results = []
        for pair in pairs:
            res = pair.result
            res.seconds = time.monotonic() - started
            if res.error:
                log.error("%s", res.error)
            self.ledger.finish_run(pair.run_id, res.status, res.as_dict(), res.error)
            results.append(res)
        return results

    def _step(self, segment: str, pair: _Pair, step: Callable[[], object]) -> bool:
        with log_context(run_id=str(pair.run_id), segment=segment, destination=pair.name):
            return self._guard(pair, step)

    def _send_all(self, con: duckdb.DuckDBPyConnection, segment: str, seg: SegmentConfig, pairs: list[_Pair]) -> None:
        """Send each pair's file and, once it went through, finish the pair: the pairs at once (each to its own
        platform, each acknowledgement its own journal row, each pair's DuckDB work on a cursor of its own)."""

        def send_and_finish(pair: _Pair, cur: duckdb.DuckDBPyConnection) -> None:
            if self._step(segment, pair, lambda: self._send(segment, pair)):
                self._step(segment, pair, lambda: self._finish_pair(cur, segment, seg, pair))

        if len(pairs) <= 1:
            for pair in pairs:
                send_and_finish(pair, con)
            return
        cursors = [con.cursor() for _ in pairs]
        try:
            with ThreadPoolExecutor(max_workers=len(pairs), thread_name_prefix="send") as pool:
                futures = [pool.submit(contextvars.copy_context().run, send_and_finish, p, c)
                           for p, c in zip(pairs, cursors, strict=True)]  # fmt: skip
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    self._abort.set()  # the other pairs stop at their next batch; what they sent is journaled
                    raise
        finally:
            self._abort.clear()  # after the pool's threads have ended
            for c in cursors:
                c.close()

    def _guard(self, pair: _Pair, step: Callable[[], object]) -> bool:
        """Run one step of a pair; its errors end that pair's run with the matching status."""
        res, where = pair.result, f"{pair.result.segment} -> {pair.name}"
        try:
            step()
            return True
        except GuardrailError as exc:
            res.status, res.error = "stopped", str(exc)
        except Interrupted as exc:
            res.status, res.error = "interrupted", f"{where}: {exc}"
        except QuotaExhaustedError as exc:
            res.status, res.error = "failed", f"{where}: quota exhausted, will retry on the next run: {exc}"
        except FatalError as exc:
            res.status, res.error = "failed", f"{where}: {exc}"
        except DestinationError as exc:
            res.status, res.error = "failed", f"{where}: gave up after retries: {exc}"
        except ConnectorError as exc:
            self._fail(res, f"{where}: {exc}", exc)
        return False

    @staticmethod
    def _fail(res: RunResult, message: str, exc: Exception) -> None:
        res.status, res.error = "failed", message
        res.error_kind = "config" if isinstance(exc, ConfigError) else None

    def _open_pair(self, con: duckdb.DuckDBPyConnection, segment: str, seg: SegmentConfig, pair: _Pair,
                   opts: SyncOptions) -> None:  # fmt: skip
        pair.payload_keys = Normalizer(pair.platform, list(seg.identifiers), seg.default_region).schema()
        pair.files = PairFiles(self.files_root, segment, pair.name)
        if seg.value is not None:
            pair.values = value_support(pair.config)
            if pair.values.mode == "none":
                note = (f"value column {seg.value!r} is not sent: the Data Manager API has no per-member value "
                        "(use tiers: a list per tier; the Google Ads API path takes lifetime value, see docs/platforms.md)")
                log.info("%s -> %s: %s", segment, pair.name, note)
                pair.result.notes.append(note)
        if not opts.dry_run:
            reconcile(self.ledger, segment, pair.name, self.destination(pair.name))
            dest = self.destination(pair.name)
            pair.audience = self._ensure_audience(segment, pair, dest)
        else:
            rec = self.ledger.get_audience(segment, pair.name)
            pair.result.audience_id = rec.audience_id if rec else None
        pair.pointer = self.ledger.pointer(segment, pair.name)

    # ------------------------------------------------------------------ planning

    def _plan(self, con: duckdb.DuckDBPyConnection, segment: str, seg: SegmentConfig, pairs: list[_Pair],
              opts: SyncOptions) -> None:  # fmt: skip
        inputs = []
        for i, pair in enumerate(pairs):
            assert pair.files is not None
            current = current_sql(pair.files, pair.pointer, member_schema(pair.payload_keys))
            positioned = current_sql(pair.files, pair.pointer, member_schema(pair.payload_keys), positions=True)
            journal = register_journal(con, self.ledger, segment, pair.name, f"{i}") if current is not None else ("", "")
            paths = [pair.files.path(n) for n in (pair.pointer.base, pair.pointer.delta) if n]
            expire_before = None
            if isinstance(pair.config, GoogleDestinationConfig):
                expire_before = now() - timedelta(days=pair.config.membership_days - pair.config.resend_before_expiry_days)
            full = opts.full_refresh or self._refresh_due(segment, pair)
            pair.result.full_refresh = full
            size = self.destination(pair.name).capabilities.max_batch_size if not opts.dry_run else 10_000
            inputs.append(PairInput(
                name=pair.name, platform=pair.platform, payload_keys=pair.payload_keys, files=pair.files,
                pointer=pair.pointer, current=current, journal=journal, run_id=pair.run_id, positioned=positioned,
                batch_size=size,
                expire_before=expire_before, full_refresh=full, value_mode=pair.values.mode,
                value_max=pair.values.max_value, fingerprinted=members_fingerprinted(con, paths),
            ))  # fmt: skip
        tier = None
        if seg.value is not None and any(p.values.mode != "none" for p in pairs):
            # a tier's rows carry their tier; any other source may have the column of its own
            config = self.settings.sources[seg.source] if isinstance(seg.source, str) else seg.source
            tier = TIER_COLUMN if seg.tiers or TIER_COLUMN in source_header(self.settings, config) else None
        threshold = seg.value_resend_threshold
        spec = SegmentSpec(
            key=seg.key, identifiers={str(f): c for f, c in seg.identifiers.items()}, default_region=seg.default_region,
            mode=seg.mode,
            consent_columns=(seg.consent.ad_user_data_column, seg.consent.ad_personalization_column),
            consent_defaults=(seg.consent.ad_user_data, seg.consent.ad_personalization),
            value=seg.value, tier=tier,
            value_threshold=threshold if threshold is not None else self.settings.value_resend_threshold,
        )  # fmt: skip
        progress = self._progress

        def rows_read(rows: int) -> None:
            if progress:
                progress(ProgressEvent(segment, None, "reading", rows, None))

        planner = Planner(con, spec, inputs, dry_run=opts.dry_run, on_rows=rows_read, batch_rows=self._batch_rows,
                          threads=self.settings.threads)  # fmt: skip
        assert self._sources is not None
        # a tier's `_tier` is the ranking's, not a source column
        columns = [c for c in planner.source_columns() if not (seg.tiers and c == TIER_COLUMN)]
        with self._sources.rows(con, segment, seg, columns) as rows:
            for pair in pairs:
                pair.result.clv = rows.clv.as_dict() if rows.clv else None
                pair.result.tier = rows.tier
                pair.result.phases["source"] = rows.seconds
            plans = planner.run(rows.name)
        for pair, plan in zip(pairs, plans, strict=True):
            pair.plan = plan
            pair.result.counts = plan.counts
            if plan.input.current is None:  # a first base: every member in it is an add
                plan.sends = plan.counts.adds
                plan.add_batches = -(-plan.counts.adds // plan.input.batch_size)
        fallback = plans[0].counts.fallback_values if plans else 0
        if fallback:
            log.info("%s: %d identifier values went through the Python rules (not a plain shape)", segment, fallback)

    def _refresh_due(self, segment: str, pair: _Pair) -> bool:
        cfg = pair.config
        if not isinstance(cfg, MetaDestinationConfig) or not cfg.refresh_interval_days:
            return False
        rec = self.ledger.get_audience(segment, pair.name)
        if rec is None or rec.last_replace_at is None:
            return False  # never replaced yet: the first interval starts now
        return now() - rec.last_replace_at > timedelta(days=cfg.refresh_interval_days)

    # ------------------------------------------------------------------ a pair's run

    def _write_ahead(self, segment: str, seg: SegmentConfig, pair: _Pair, opts: SyncOptions) -> None:
        """Guardrails and dry run, then the write-ahead point: the file is durable, the pointer moves (the
        platform hears of it after)."""
        plan, res = pair.plan, pair.result
        assert plan is not None and pair.files is not None
        where = f"{segment} -> {pair.name}"
        max_share = seg.max_remove_share if seg.max_remove_share is not None else self.settings.max_remove_share
        try:
            check_guardrails(plan.counts, mode=seg.mode, max_remove_share=max_share, force=opts.force, pair=where)
        except GuardrailError:
            self._discard(pair)
            raise
        if opts.dry_run:
            res.status = "dry_run"
            return
        assert pair.audience is not None
        res.audience_id = pair.audience.audience_id
        if plan.file is not None:
            base = plan.file if plan.as_base else pair.pointer.base
            delta = None if plan.as_base else plan.file
            pair.files.publish(plan.file)
            pair.pointer = self.ledger.move_pair(segment, pair.name, pair.pointer, base, delta, pair.run_id)
            pair.path = pair.files.path(plan.file)

    def _send(self, segment: str, pair: _Pair) -> None:
        """Send the pair's file (on a thread of its own when the segment has several pairs)."""
        plan, res = pair.plan, pair.result
        assert plan is not None
        if pair.path is None:
            return
        assert pair.audience is not None
        sender = Sender(self.ledger, segment, pair.name, self.destination(pair.name), pair.audience, plan,
                        pair.payload_keys, pair.values.mode != "none", self._check_stop, self._progress)  # fmt: skip
        t0 = time.monotonic()
        if plan.input.full_refresh:
            res.write_calls += sender.replace(pair.path)
            self.ledger.update_audience(segment, pair.name, last_replace_at=now())
        else:
            res.write_calls += sender.push(pair.path)
            res.deferred += sender.deferred
        res.phases["sending"] = time.monotonic() - t0

    def _finish_pair(self, con: duckdb.DuckDBPyConnection, segment: str, seg: SegmentConfig, pair: _Pair) -> None:
        """After sending: requests polled, counts settled, the lookalike made sure of, the audience read."""
        dest = self.destination(pair.name)
        res = pair.result
        assert pair.audience is not None
        t0 = time.monotonic()
        reconcile(self.ledger, segment, pair.name, dest)
        self._settle(con, segment, pair)
        res.phases["settling"] = time.monotonic() - t0
        spec = seg.lookalike.meta if pair.platform == "meta" else seg.lookalike.google
        if spec is not None:
            res.lookalike_id, res.lookalike_state, warning = ensure_lookalike(self.ledger, segment, pair.name, dest,
                                                                              pair.audience, spec)  # fmt: skip
            if warning:
                res.status, res.warning = "warning", warning
        record_status(self.ledger, segment, pair.name, dest, pair.audience)
        res.rejected_reasons = self.ledger.rejected_reasons(segment, pair.name)
        res.rejected = sum(res.rejected_reasons.values())

    def _discard(self, pair: _Pair) -> None:
        """A plan that will not be sent: its file goes (the pointer never named it)."""
        if pair.plan is not None and pair.plan.file and pair.files is not None:
            pair.files.path(pair.plan.file).unlink(missing_ok=True)

    def _ensure_audience(self, segment: str, pair: _Pair, dest: Destination) -> AudienceRef:
        rec = self.ledger.get_audience(segment, pair.name)
        known = AudienceRef(rec.audience_id, rec.name, dict(rec.extra)) if rec else None
        name = rec.name if rec else f"connector: {segment}"
        aud = dest.ensure_audience(name, known, pair.payload_keys, value_based=pair.values.mode != "none")
        pair.result.audience_id = aud.audience_id
        recreated = rec is not None and aud.audience_id != rec.audience_id
        if rec is None or recreated or aud.extra != rec.extra:
            self.ledger.save_audience(segment, pair.name, pair.platform, aud.audience_id, aud.name, aud.extra,
                                      reset_lookalike=recreated)  # fmt: skip
        if recreated:
            # the platform lost the audience, or it cannot be what the segment needs: nothing the ledger says
            # is on it holds, so every member is sent
            why = aud.note or "is gone from the platform"
            log.warning("%s -> %s: the audience %s %s; %s replaces it and every member is sent again", segment,
                        pair.name, rec.audience_id if rec else "?", why, aud.audience_id)  # fmt: skip
            if aud.note:
                pair.result.notes.append(f"audience {rec.audience_id if rec else '?'} {aud.note}: new audience "
                                         f"{aud.audience_id}, every member sent again")  # fmt: skip
            pointer = self.ledger.pointer(segment, pair.name)
            if pointer.version:
                self.ledger.move_pair(segment, pair.name, pointer, None, None, None, forget=True)
            pair.result.audience_recreated = True
        return aud

    def _check_stop(self) -> None:
        if self.stop.is_set() or self._abort.is_set():
            raise Interrupted("shutdown requested; committed batches are kept, the rest is sent on the next run")

    def _settle(self, con: duckdb.DuckDBPyConnection, segment: str, pair: _Pair) -> None:
        """After the pushes: a large delta folded into a new base, unreferenced files dropped, counts recorded."""
        assert pair.files is not None
        plan = pair.plan
        planned = None
        # the plan's counts hold unless a member awaits a Google confirmation (then only reading the pair tells)
        if plan is not None and plan.kept_states is not None and plan.rewritten is not None:
            planned = None if plan.kept_states[ACCEPTED] else (plan.kept_states, plan.rewritten)
        pair.pointer = settle(con, self.ledger, segment, pair.name, pair.files, pair.pointer, pair.payload_keys,
                              pair.run_id, planned)  # fmt: skip

def _serialized(progress: Progress) -> Progress:
    """`progress`, called by one thread at a time (pairs are sent at once)."""
    lock = threading.Lock()

    def report(ev: ProgressEvent) -> None:
        with lock:
            progress(ev)

    return report


__all__ = ["Engine", "RunResult", "SourceError", "SyncOptions"]
