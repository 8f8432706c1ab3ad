"""One sync of a segment: lease -> recover -> read -> plan -> write-ahead -> push -> finish.

For each (segment, destination) pair, in this order:

1. the pair's lock is held (`pair_lock`), earlier Google requests are polled, the audience is made sure
   of (a recreated audience starts the pair over from an empty ledger);
2. the source is read once for all of the segment's pairs and each pair is planned (`connector.diff`):
   its new member file (base, or cumulative delta) is written and fsynced before anything is sent;
3. guardrails, dry run;
4. one transaction moves the pair's pointer to that file: the write-ahead point;
5. removals, then additions, 10,000 a call, straight from the file's columns, each pair on a thread of its
   own (a segment's destinations are sent to at once); each acknowledged call is one journal row, so a
   crash re-sends at most the batch in flight of each pair;
6. requests are polled again, a large delta is compacted into a new base, unreferenced files go,
   counts are recorded, the lookalike is made sure of and the audience status read.

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
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connector.destinations import build_destination, value_support
from connector.destinations.base import (
    AudienceRef,
    BatchSession,
    Destination,
    LookalikeRef,
    MemberBatch,
    ValueSupport,
)
from connector.diff import PairInput, PairPlan, PlanCounts, Planner, SegmentSpec, check_guardrails
from connector.errors import (
    ConfigError,
    ConnectorError,
    DestinationError,
    FatalError,
    GuardrailError,
    LedgerError,
    QuotaExhaustedError,
    SourceError,
)
from connector.identifiers.normalize import Normalizer
from connector.ledger.files import MEMBER, OWED, SENT, PairFiles, member_root, member_schema, payload_column
from connector.ledger.journal import ON_PLATFORM, BatchAck, Journal, PairPointer, now
from connector.ledger.recovery import (
    ACCEPTED,
    compact,
    current_sql,
    register_journal,
    resolved_sql,
    state_counts,
    state_histogram,
    state_names,
)
from connector.logs import log_context
from connector.progress import Progress, ProgressEvent
from connector.retry import RetryStats
from connector.segments import SegmentSources, source_header
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

COMPACT_SHARE = 0.2  # a delta past this share of its base is folded into a new base


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
        batch_rows: int = 100_000,
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
            for pair in self._send_all(name, ready):
                self._step(name, pair, lambda p=pair: self._finish_pair(con, name, seg, p))  # type: ignore[misc]
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

    def _send_all(self, segment: str, pairs: list[_Pair]) -> list[_Pair]:
        """Send each pair's file, the pairs at once (each to its own platform, each acknowledgement its own
        journal row); returns the pairs whose sending went through."""
        if len(pairs) <= 1:
            return [p for p in pairs if self._step(segment, p, lambda p=p: self._send(segment, p))]  # type: ignore[misc]
        try:
            with ThreadPoolExecutor(max_workers=len(pairs), thread_name_prefix="send") as pool:
                futures = [pool.submit(contextvars.copy_context().run, self._step, segment, p,
                                       lambda p=p: self._send(segment, p)) for p in pairs]  # fmt: skip
                try:
                    done = [f.result() for f in futures]
                except BaseException:
                    self._abort.set()  # the other pairs stop at their next batch; what they sent is journaled
                    raise
        finally:
            self._abort.clear()  # after the pool's threads have ended
        return [p for p, ok in zip(pairs, done, strict=True) if ok]

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
            self._reconcile(segment, pair.name)
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
            current = current_sql(pair.files, pair.pointer, _schema(pair.payload_keys))
            journal = register_journal(con, self.ledger, segment, pair.name, f"{i}") if current is not None else ("", "")
            expire_before = None
            if isinstance(pair.config, GoogleDestinationConfig):
                expire_before = now() - timedelta(days=pair.config.membership_days - pair.config.resend_before_expiry_days)
            full = opts.full_refresh or self._refresh_due(segment, pair)
            pair.result.full_refresh = full
            size = self.destination(pair.name).capabilities.max_batch_size if not opts.dry_run else 10_000
            inputs.append(PairInput(
                name=pair.name, platform=pair.platform, payload_keys=pair.payload_keys, files=pair.files,
                pointer=pair.pointer, current=current, journal=journal, run_id=pair.run_id, batch_size=size,
                expire_before=expire_before, full_refresh=full, value_mode=pair.values.mode,
                value_max=pair.values.max_value,
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
        dest = self.destination(pair.name)
        t0 = time.monotonic()
        if plan.input.full_refresh:
            res.write_calls += self._replace(segment, pair, dest, pair.path)
            self.ledger.update_audience(segment, pair.name, last_replace_at=now())
        else:
            res.write_calls += self._push(segment, pair, dest, pair.path)
        res.phases["sending"] = time.monotonic() - t0

    def _finish_pair(self, con: duckdb.DuckDBPyConnection, segment: str, seg: SegmentConfig, pair: _Pair) -> None:
        """After sending: requests polled, counts settled, the lookalike made sure of, the audience read."""
        dest = self.destination(pair.name)
        res = pair.result
        assert pair.audience is not None
        t0 = time.monotonic()
        self._reconcile(segment, pair.name)
        self._settle(con, segment, pair)
        res.phases["settling"] = time.monotonic() - t0
        self._lookalike(segment, seg, pair, dest)
        self._read_status(segment, pair.name, dest, pair.audience)
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

    def _batches(self, pair: _Pair, path: Path, members_only: bool = False) -> Iterator[tuple[int, int, MemberBatch]]:
        """(b, kind, members) of each batch this run sends, read from its file in the file's order (batch
        numbers ascending: the file was written so)."""
        assert pair.plan is not None
        keys = [payload_column(k) for k in pair.payload_keys]
        pending: list[pa.RecordBatch] = []
        cur = last = -1

        def flush() -> tuple[int, int, MemberBatch]:
            t = pa.Table.from_batches(pending).combine_chunks()
            payload = {k: t.column(payload_column(k)).chunk(0) for k in pair.payload_keys}
            consent = t.column("c").chunk(0)
            values = t.column("v").chunk(0) if pair.values.mode != "none" else None
            batch = MemberBatch(t.column("k").chunk(0), payload, consent if consent.null_count < len(consent) else None,
                                values)  # fmt: skip
            return cur, int(t.column("kind")[0].as_py()), batch

        # pre_buffer=False: pyarrow's pre-buffering keeps every row group read so far until the reader ends
        # (1.2 GB for a 10M-member file); without it one row group at a time is held
        reader = pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=pair.plan.input.batch_size,
                                                   columns=["k", "kind", "st", "run", "b", *keys, "c", "v"])  # fmt: skip
        for rb in reader:
            sending = pc.and_(pc.equal(rb.column("run"), pair.run_id), pc.equal(rb.column("st"), SENT))
            if members_only:
                sending = pc.and_(sending, pc.equal(rb.column("kind"), MEMBER))
            rb = rb.filter(pc.fill_null(sending, False))
            if not rb.num_rows:
                continue
            b = rb.column("b").to_numpy(zero_copy_only=False)
            starts = [0, *(np.flatnonzero(np.diff(b)) + 1).tolist(), len(b)]
            for s, e in pairwise(starts):
                value = int(b[s])
                if value != cur:
                    if value < last:
                        raise LedgerError("a member file is out of batch order; run again with --full-refresh")
                    if pending:
                        yield flush()
                    pending, cur, last = [], value, value
                pending.append(rb.slice(s, e - s))
        if pending:
            yield flush()

    def _push(self, segment: str, pair: _Pair, dest: Destination, path: Path) -> int:
        plan, res = pair.plan, pair.result
        assert plan is not None and pair.audience is not None
        sid = int(time.time() * 1000) % (1 << 62)
        calls = sent = 0
        seq = {OWED: 0, MEMBER: 0}
        totals = {OWED: plan.remove_batches, MEMBER: plan.add_batches}
        estimated = {OWED: plan.counts.removes + plan.counts.changes, MEMBER: plan.sends}
        for b, kind, batch in self._batches(pair, path):
            self._check_stop()
            seq[kind] += 1
            n = max(totals[kind], seq[kind])
            session = BatchSession(session_id=sid + kind, seq=seq[kind], last=seq[kind] >= n, estimated_total=estimated[kind])
            if kind == OWED:
                out = dest.remove_members(pair.audience, batch, session)
                res.deferred += len(out.deferred)
                ack = BatchAck(pair.run_id, b, "remove", len(batch), out.request_id, deferred=dict(out.deferred))
            else:
                out = dest.add_members(pair.audience, batch, session)
                ack = BatchAck(pair.run_id, b, "add", len(batch), out.request_id, "pending" if out.pending else "ok",
                               rejected=dict(out.rejected))  # fmt: skip
            calls, sent = calls + 1, sent + len(batch)
            self.ledger.ack_batch(segment, pair.name, ack)
            if self._progress:
                self._progress(ProgressEvent(segment, pair.name, "sending", sent, plan.sends))
        if calls:
            dest.finish(pair.audience)
            if self._progress:
                self._progress(ProgressEvent(segment, pair.name, "done", sent, plan.sends))
        return calls

    def _replace(self, segment: str, pair: _Pair, dest: Destination, path: Path) -> int:
        plan = pair.plan
        assert plan is not None and pair.audience is not None
        sent = 0

        def batches() -> Iterator[MemberBatch]:
            nonlocal sent
            for _, _, batch in self._batches(pair, path, members_only=True):
                self._check_stop()
                sent += 1
                yield batch

        out = dest.replace_members(pair.audience, batches(), plan.sends)
        self.ledger.ack_batch(segment, pair.name, BatchAck(pair.run_id, 0, "replace", plan.sends, out.request_id,
                                                           "pending" if out.pending else "ok",
                                                           rejected=dict(out.rejected)))  # fmt: skip
        return max(1, sent)

    def _reconcile(self, segment: str, dest_name: str) -> None:
        ids = self.ledger.pending_requests(segment, dest_name)
        if not ids:
            return
        rec = self.ledger.get_audience(segment, dest_name)
        if rec is None:
            return
        dest = self.destination(dest_name)
        outcomes = dest.reconcile(AudienceRef(rec.audience_id, rec.name, dict(rec.extra)), ids)
        for rid, outcome in outcomes.items():
            if outcome.state == "succeeded":
                self.ledger.resolve_request(segment, dest_name, rid, True, None, outcome.rejected)
            elif outcome.state == "failed":
                log.warning("%s/%s: request failed on the platform (%s); its members will be sent again",
                            segment, dest_name, outcome.reason)  # fmt: skip
                self.ledger.resolve_request(segment, dest_name, rid, False, outcome.reason, outcome.rejected)

    def _settle(self, con: duckdb.DuckDBPyConnection, segment: str, pair: _Pair) -> None:
        """After the pushes: fold a large delta into a new base, drop unreferenced files, record counts."""
        assert pair.files is not None
        schema = _schema(pair.payload_keys)
        pointer = pair.pointer
        tag = f"s{pair.run_id}"
        current = current_sql(pair.files, pointer, schema)
        if current is None:
            self.ledger.set_counts(segment, pair.name, {})
            return
        acks, rej = register_journal(con, self.ledger, segment, pair.name, tag)
        resolved = resolved_sql(current, acks, rej)
        states = self._states_after(con, pair, tag, acks, rej)
        if pointer.delta and pointer.base:
            base_rows = pq.ParquetFile(pair.files.path(pointer.base)).metadata.num_rows
            delta_rows = pq.ParquetFile(pair.files.path(pointer.delta)).metadata.num_rows
            if delta_rows > COMPACT_SHARE * base_rows:
                name = pair.files.new_name("base", pair.run_id)
                compact(con, pair.files, pointer, pair.payload_keys, resolved, name)
                pair.files.publish(name)
                pair.pointer = pointer = self.ledger.move_pair(segment, pair.name, pointer, name, None, pair.run_id)
                self.ledger.forget_batches(segment, pair.name, pair.run_id)
                current = current_sql(pair.files, pointer, schema)
                assert current is not None
                acks, rej = register_journal(con, self.ledger, segment, pair.name, tag)
                resolved = resolved_sql(current, acks, rej)
        pair.files.collect([pointer.base, pointer.delta])
        counts = state_names(states) if states is not None else state_counts(con, resolved)
        self.ledger.set_counts(segment, pair.name, counts)

    @staticmethod
    def _states_after(con: duckdb.DuckDBPyConnection, pair: _Pair, tag: str, acks: str, rej: str) -> list[int] | None:
        """The pair's members by state now, from its plan: the members its file left as they were (their
        states cannot have changed since planning, none awaiting a Google confirmation) and the member rows
        it wrote, settled by this run's acknowledgements. None when only reading the pair again tells."""
        plan = pair.plan
        if plan is None or plan.kept_states is None or plan.rewritten is None or plan.kept_states[ACCEPTED]:
            return None
        con.register(f"rewritten_{tag}", plan.rewritten)
        rewritten = state_histogram(con, resolved_sql(f"SELECT * FROM rewritten_{tag}", acks, rej))
        return [a + b for a, b in zip(plan.kept_states, rewritten, strict=True)]

    def _lookalike(self, segment: str, seg: SegmentConfig, pair: _Pair, dest: Destination) -> None:
        spec_model = seg.lookalike.meta if pair.platform == "meta" else seg.lookalike.google
        if spec_model is None or pair.audience is None:
            return
        res = pair.result
        rec = self.ledger.get_audience(segment, pair.name)
        known = (
            LookalikeRef(rec.lookalike_id, rec.lookalike_state or "created", dict(rec.lookalike_details))
            if rec and rec.lookalike_id
            else None
        )
        counts = self.ledger.counts(segment, pair.name)
        seed = sum(counts.get(s, 0) for s in ON_PLATFORM)
        try:
            ref = dest.ensure_lookalike(pair.audience, spec_model.model_dump(exclude_none=True), known, seed)
        except DestinationError as exc:
            res.status = "warning"
            res.warning = f"lookalike not created: {exc}"
            log.warning("%s -> %s: %s", segment, pair.name, res.warning)
            return
        if ref is None:
            res.lookalike_state = f"waiting for seed (>= {spec_model.min_seed_size} matched members)"
            return
        if not ref.lookalike_id:
            res.lookalike_state = ref.state  # not available for this destination; the reason is in the state
            return
        res.lookalike_id, res.lookalike_state = ref.lookalike_id, ref.state
        self.ledger.update_audience(segment, pair.name, lookalike_id=ref.lookalike_id, lookalike_state=ref.state,
                                    lookalike_details=ref.details)  # fmt: skip

    def _read_status(self, segment: str, dest_name: str, dest: Destination, audience: AudienceRef | None) -> None:
        if audience is None:
            return
        try:
            st = dest.audience_status(audience)
        except DestinationError as exc:
            log.warning("%s -> %s: could not read audience status: %s", segment, dest_name, exc)
            return
        self.ledger.update_audience(
            segment, dest_name,
            last_status={"size_lower": st.size_lower, "size_upper": st.size_upper, "match_rate": st.match_rate,
                         "state": st.state, **st.details},
            last_status_at=now(),
        )  # fmt: skip


def _serialized(progress: Progress) -> Progress:
    """`progress`, called by one thread at a time (pairs are sent at once)."""
    lock = threading.Lock()

    def report(ev: ProgressEvent) -> None:
        with lock:
            progress(ev)

    return report


def _schema(payload_keys: Sequence[str]) -> pa.Schema:
    return member_schema(payload_keys)


__all__ = ["Engine", "RunResult", "SourceError", "SyncOptions"]
