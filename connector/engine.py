"""One sync: read a segment once, plan every destination of it, push, commit, lookalike.

Per (segment, destination) pair the order is fixed::

    reconcile earlier async requests -> plan (ledger index vs source) -> guardrails
    -> write the plan to the ledger -> push removals, then additions, batch by batch, each batch
    committed in its own transaction after the platform acknowledged it -> finish -> reconcile
    -> lookalike -> read audience status

Removals go before additions so that a member whose identifiers changed (old payload removed,
new payload added) never loses an identifier the two payloads share.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache, partial
from itertools import repeat
from pathlib import Path
from typing import Any, cast

import numpy as np

from connector.destinations import build_destination
from connector.destinations.base import (
    AudienceRef,
    BatchSession,
    Consent,
    Destination,
    LookalikeRef,
    Member,
)
from connector.diff import PlanCounts, SeenKeys, check_guardrails, classify
from connector.errors import (
    ConfigError,
    ConnectorError,
    DestinationError,
    FatalError,
    GuardrailError,
    QuotaExhaustedError,
    SourceError,
)
from connector.identifiers.hashing import fingerprints, hex_of_keys, member_key_array
from connector.identifiers.normalize import NormalizedBatch, Normalizer
from connector.identifiers.pool import NormalizePool, default_workers
from connector.ledger.store import (
    ON_PLATFORM,
    LedgerIndex,
    NewColumns,
    PendingMember,
    SqlLedger,
    StagedMember,
    insert_rows,
    key_prefixes,
    now,
)
from connector.logs import log_context
from connector.progress import Progress, ProgressEvent
from connector.retry import RetryStats
from connector.settings import (
    ConnectorSettings,
    DestinationConfig,
    GoogleDestinationConfig,
    MetaDestinationConfig,
    SegmentConfig,
)
from connector.sources import open_source

log = logging.getLogger("connector.engine")

DestinationFactory = Callable[[str, DestinationConfig, Path, RetryStats], Destination]
# (segment, destination) -> a context manager held while the pair is planned and pushed
PairLock = Callable[[str, str], AbstractContextManager[object]]


class Interrupted(ConnectorError):
    """Shutdown was requested: the batch in flight was committed, the rest waits for the next run."""

_CONSENT_WORDS = {
    "granted": True, "true": True, "yes": True, "y": True, "1": True, "t": True,
    "denied": False, "false": False, "no": False, "n": False, "0": False, "f": False,
}  # fmt: skip


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
    status: str  # success | failed | stopped | dry_run | warning
    counts: PlanCounts = field(default_factory=PlanCounts)
    run_id: int | None = None
    sandbox: bool = False
    audience_id: str | None = None
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
    retries: int = 0
    throttle_wait_seconds: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
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
            "lookalike_id": self.lookalike_id,
            "lookalike_state": self.lookalike_state,
            "retries": self.retries,
            "throttle_wait_seconds": round(self.throttle_wait_seconds, 3),
            "seconds": round(self.seconds, 3),
            "run_id": self.run_id,
            "error": self.error,
            "error_kind": self.error_kind,
            "warning": self.warning,
        }
        return d


def encode_consent(c: Consent | None) -> str:
    if c is None:
        return ""
    return "".join("U" if v is None else ("G" if v else "D") for v in (c.ad_user_data, c.ad_personalization))


def _consent_columns(seg: SegmentConfig) -> list[str]:
    return [c for c in (seg.consent.ad_user_data_column, seg.consent.ad_personalization_column) if c]


@lru_cache(maxsize=64)
def decode_consent(s: str) -> Consent | None:
    if not s:
        return None
    vals = [None if ch == "U" else ch == "G" for ch in s]
    return Consent(ad_user_data=vals[0], ad_personalization=vals[1])


def to_members(batch: Sequence[PendingMember]) -> list[Member]:
    """Pending members as sent, their payloads parsed in one call (a `json.loads` per member cost
    a cold run as much as reading them from the ledger)."""
    payloads = json.loads("[" + ",".join([p.payload for p in batch]) + "]")
    consents = [p.consent for p in batch]
    decoded = {c: decode_consent(c) for c in set(consents)}
    return list(map(Member, [p.key for p in batch], payloads, map(decoded.__getitem__, consents)))


class _Spill:
    """Staged members of one pair, spilled to a temporary SQLite file so a cold run of millions
    of members does not hold them all in memory before the plan passes its guardrails."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(
            dir=directory, prefix="plan-", suffix=".db", delete=False
        )
        self._file.close()
        self._db = sqlite3.connect(self._file.name)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE s (k TEXT, fp INTEGER, p TEXT, c TEXT, known INTEGER)")
        self._buf: list[tuple[str, int, str, str, int]] = []
        self.count = 0

    def add_many(
        self, keys: Sequence[str], fps: Sequence[int], payloads: Sequence[str], consents: Sequence[str], known: bool
    ) -> None:
        # sqlite3 INTEGER is signed 64-bit
        signed = np.array(fps, dtype=np.uint64).view(np.int64).tolist()
        self._buf.extend(zip(keys, signed, payloads, consents, repeat(int(known), len(keys)), strict=True))
        self.count += len(keys)
        if len(self._buf) >= 50_000:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            insert_rows(self._db.execute, "INSERT INTO s", self._buf)
            self._buf.clear()

    def _columns(self, known: bool, size: int) -> Iterator[NewColumns]:
        """Staged members the planner found (or did not find) in the ledger, `size` at a time, as columns
        (keys, unsigned fingerprints, payloads, consents) in key order: the ledger's indexes then grow
        at one end, and the push (which reads pending members in key order) finds them side by side."""
        self.flush()
        cur = self._db.execute("SELECT k, fp, p, c FROM s WHERE known = ? ORDER BY k", (int(known),))
        while rows := cur.fetchmany(size):
            keys, fps, payloads, consents = zip(*rows, strict=True)
            yield list(keys), np.array(fps, dtype=np.int64).view(np.uint64).tolist(), list(payloads), list(consents)

    def known(self, size: int = 10_000) -> Iterator[list[StagedMember]]:
        """Staged members the ledger has a row for (changed, or to be sent again)."""
        for keys, fps, payloads, consents in self._columns(True, size):
            yield list(map(StagedMember, keys, fps, payloads, consents))

    def new(self, size: int = 10_000) -> Iterator[NewColumns]:
        """Staged members new to the ledger, column-wise (no object per member)."""
        return self._columns(False, size)

    def close(self) -> None:
        self._db.close()
        Path(self._file.name).unlink(missing_ok=True)


@dataclass(slots=True)
class _PairPlan:
    name: str
    config: DestinationConfig
    platform: str
    normalizer: Normalizer
    index: LedgerIndex
    seen: np.ndarray[Any, np.dtype[np.bool_]]
    counts: PlanCounts
    spill: _Spill | None
    refresh: list[tuple[str, int]] = field(default_factory=list)
    # ledger positions claimed by a source row that then had no payload (invalid, consent denied)
    dropped: list[int] = field(default_factory=list)
    result: RunResult | None = None


@dataclass(slots=True)
class _Normalizing:
    """Rows of one batch and pair being normalized (maybe in a worker), waiting to be planned."""

    plan: _PairPlan
    rows: np.ndarray[Any, np.dtype[np.intp]]  # the batch's rows, in `keys` order
    keys: list[str]  # member key of each row
    fps: list[int]
    pos: list[int]  # ledger position of each row's member, -1 for a new member
    consent: list[str]  # encoded consent of each row
    result: Callable[[], NormalizedBatch] | None = None


def _nth(results: Callable[[], list[NormalizedBatch]], i: int) -> NormalizedBatch:
    return results()[i]


def _submit(
    pool: NormalizePool, works: list[_Normalizing], columns: Mapping[str, list[str | None]],
    id_fields: list[tuple[str, str]],
) -> None:  # fmt: skip
    """Send a batch's rows (the identifier `columns` of the whole batch) to normalization: pairs that want
    the very same rows with one region (the usual case: a segment's destinations) share one task, so each
    value is picked out and cleaned once for them all."""
    groups: list[list[_Normalizing]] = []
    for work in works:
        for group in groups:
            first = group[0]
            if first.plan.normalizer.default_region == work.plan.normalizer.default_region and np.array_equal(
                first.rows, work.rows
            ):
                group.append(work)
                break
        else:
            groups.append([work])
    for group in groups:
        picked = group[0].rows.tolist()
        values = [(f, [columns[col][i] for i in picked]) for f, col in id_fields]
        wait = pool.submit([(w.plan.platform, w.plan.normalizer.default_region) for w in group], values)
        for i, work in enumerate(group):
            work.result = partial(_nth, wait, i)


class Engine:
    """Runs syncs for one settings object and one ledger. Not thread-safe: one per worker."""

    def __init__(
        self,
        settings: ConnectorSettings,
        ledger: SqlLedger | None = None,
        destination_factory: DestinationFactory | None = None,
        progress: Progress | None = None,
        pair_lock: PairLock | None = None,
        stop: threading.Event | None = None,
        normalize_pool: NormalizePool | None = None,
        batch_rows: int = 50_000,
    ) -> None:
        self.settings = settings
        self._batch_rows = batch_rows  # source rows read, classified and normalized together
        self._pair_lock = pair_lock
        self.stop = stop or threading.Event()
        self.ledger = ledger or SqlLedger(settings.ledger_sqlalchemy_url(), index_dir=settings.index_path)
        self._own_ledger = ledger is None
        self._factory = destination_factory or (
            lambda name, cfg, state_dir, stats: build_destination(name, cfg, state_dir, stats)
        )
        self._progress = progress
        self._destinations: dict[str, Destination] = {}
        self.stats: dict[str, RetryStats] = {}
        self._normalize = normalize_pool or NormalizePool(
            default_workers() if settings.workers is None else settings.workers
        )

    # ------------------------------------------------------------------ lifecycle

    def destination(self, name: str) -> Destination:
        if name not in self._destinations:
            stats = self.stats.setdefault(name, RetryStats())
            self._destinations[name] = self._factory(
                name, self.settings.destinations[name], self.settings.state_path, stats
            )
        return self._destinations[name]

    def close(self) -> None:
        for d in self._destinations.values():
            try:
                d.close()
            except Exception:  # noqa: BLE001 - closing must not hide the run's own outcome
                log.warning("closing destination %s failed", d.name)
        self._destinations.clear()
        self._normalize.close()
        if self._own_ledger:
            self.ledger.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public

    def sync(self, segments: Sequence[str] | None = None, options: SyncOptions | None = None) -> list[RunResult]:
        opts = options or SyncOptions()
        names = list(segments) if segments else list(self.settings.segments)
        unknown = [n for n in names if n not in self.settings.segments]
        if unknown:
            raise ConfigError(
                f"unknown segment(s): {', '.join(unknown)} "
                f"(configured: {', '.join(self.settings.segments) or 'none'})"
            )
        results: list[RunResult] = []
        try:
            for name in names:
                results.extend(self.sync_segment(name, opts))
        finally:
            # a server's engine lives on between runs: its idle workers (~70 MB each) do not
            self._normalize.close()
        return results

    def sync_segment(self, name: str, opts: SyncOptions) -> list[RunResult]:
        seg = self.settings.segments[name]
        dest_names = [d for d in seg.destinations if opts.destinations is None or d in opts.destinations]
        if not dest_names:
            return []
        with ExitStack() as locks:
            if self._pair_lock is not None:
                # sorted: two processes locking the same pairs never deadlock
                for d in sorted(dest_names):
                    locks.enter_context(self._pair_lock(name, d))
            return self._sync_locked(name, seg, dest_names, opts)

    def _sync_locked(self, name: str, seg: SegmentConfig, dest_names: list[str], opts: SyncOptions) -> list[RunResult]:
        started = time.monotonic()
        plans: list[_PairPlan] = []
        run_ids: dict[str, int] = {}
        try:
            for d in dest_names:
                if opts.run_ids and d in opts.run_ids:
                    run_ids[d] = opts.run_ids[d]
                    self.ledger.mark_running(run_ids[d])
                else:
                    run_ids[d] = self.ledger.start_run(opts.trigger, name, d, opts.dry_run)
                plans.append(self._prepare_pair(name, seg, d, opts))
            self._read_and_classify(name, seg, plans, opts)
        except ConnectorError as exc:
            out = []
            for plan in plans or []:
                if plan.spill:
                    plan.spill.close()
                self.ledger.save_index(name, plan.name)
            for d in dest_names:
                cfg = self.settings.destinations[d]
                res = RunResult(name, d, cfg.type, "failed", error=f"segment {name}: {exc}", sandbox=cfg.sandbox,
                                error_kind="config" if isinstance(exc, ConfigError) else None)  # fmt: skip
                res.run_id = run_ids.get(d)
                res.seconds = time.monotonic() - started
                if res.run_id is not None:
                    self.ledger.finish_run(res.run_id, "failed", res.as_dict(), str(exc))
                out.append(res)
            log.error("segment %s failed: %s", name, exc)
            return out

        results = []
        for plan in plans:
            t0 = time.monotonic()
            stats = self.stats.setdefault(plan.name, RetryStats())
            retries_before, waited_before = stats.retries, stats.throttle_wait_seconds
            with log_context(run_id=str(run_ids[plan.name]), segment=name, destination=plan.name):
                res = self._run_pair(name, seg, plan, opts)
            res.run_id = run_ids[plan.name]
            res.seconds = (time.monotonic() - t0) + (t0 - started) / max(1, len(plans))
            # the stats live as long as the engine (a server's); a run reports its own share
            res.retries = stats.retries - retries_before
            res.throttle_wait_seconds = stats.throttle_wait_seconds - waited_before
            self.ledger.finish_run(res.run_id, res.status, res.as_dict(), res.error)
            results.append(res)
            # done with this pair: its index (~34 bytes a member) is not held while the next one runs
            plan.index, plan.seen = LedgerIndex.empty(), np.zeros(0, dtype=bool)
        return results

    # ------------------------------------------------------------------ planning

    def _prepare_pair(self, segment: str, seg: SegmentConfig, dest: str, opts: SyncOptions) -> _PairPlan:
        cfg = self.settings.destinations[dest]
        if not opts.dry_run:
            n = self.ledger.recover_journal(segment, dest)
            if n:
                log.info("%s/%s: %d members an earlier run may have sent are planned again", segment, dest, n)
        self.ledger.open_index(segment, dest)
        if not opts.dry_run:
            self._reconcile(segment, dest)
            if isinstance(cfg, GoogleDestinationConfig):
                horizon = now() + timedelta(days=cfg.resend_before_expiry_days)
                n = self.ledger.mark_for_resend(segment, dest, horizon)
                if n:
                    log.info("%s/%s: %d members re-sent before their membership expires", segment, dest, n)
        index = self.ledger.load_index(segment, dest)
        counts = PlanCounts(audience_before=int(index.on_platform.sum()))
        spill = None if opts.dry_run else _Spill(self.settings.state_path / "tmp")
        return _PairPlan(
            name=dest,
            config=cfg,
            platform=cfg.type,
            normalizer=Normalizer(cfg.type, list(seg.identifiers), seg.default_region),
            index=index,
            seen=np.zeros(len(index), dtype=bool),
            counts=counts,
            spill=spill,
        )

    def _consent_of(self, seg: SegmentConfig, row: Mapping[str, str | None]) -> Consent:
        c = seg.consent

        def one(column: str | None, default: str) -> bool | None:
            if column is not None:
                raw = row.get(column)
                if raw is not None and raw.strip():
                    v = _CONSENT_WORDS.get(raw.strip().lower())
                    if v is not None:
                        return v
            return None if default == "unspecified" else default == "granted"

        return Consent(
            ad_user_data=one(c.ad_user_data_column, c.ad_user_data),
            ad_personalization=one(c.ad_personalization_column, c.ad_personalization),
        )

    def _read_and_classify(
        self, segment: str, seg: SegmentConfig, plans: list[_PairPlan], opts: SyncOptions
    ) -> None:
        source = open_source(seg.source, self.settings.base_dir)
        id_fields: list[tuple[str, str]] = list(seg.identifiers.items())
        consent_cols = _consent_columns(seg)
        columns = list(dict.fromkeys([*(col for _, col in id_fields), *consent_cols, *([seg.key] if seg.key else [])]))
        seen_new = SeenKeys()
        inflight: list[_Normalizing] = []
        self._normalize.drain()
        total = 0
        for batch in source.read_batches(columns, self._batch_rows):
            n = len(batch)
            total += n
            cols = [batch.columns[c] for c in columns]
            if seg.key:
                stripped = [v.strip() if v is not None else "" for v in batch.columns[seg.key]]
                valid_row = np.array([bool(v) for v in stripped], dtype=bool)
                karr = member_key_array(stripped)  # a row without a key is invalid: its slot is never used
            else:
                valid_row = np.ones(n, dtype=bool)
                identity = zip(*cols[: len(id_fields)], strict=True)
                karr = member_key_array(["\x1f".join(v or "" for v in vals) for vals in identity])
            farr = fingerprints(cols)
            dup = np.zeros(n, dtype=bool)
            # Duplicates are a property of the source. Keys every pair's ledger knows are checked
            # against that pair's `seen` marks (no extra memory); all other keys go in `seen_new`.
            prefixes = key_prefixes(karr)
            looked_up = [plan.index.lookup(karr, prefixes) for plan in plans]
            found_all = np.ones(n, dtype=bool)
            for _, found in looked_up:
                found_all &= found
            candidates = np.flatnonzero(valid_row & ~found_all)
            dup[candidates] = seen_new.add(karr[candidates])
            works = [
                self._classify_batch(seg, plan, batch.columns, karr, farr, valid_row, dup, lk)
                for plan, lk in zip(plans, looked_up, strict=True)
            ]  # fmt: skip
            # the previous batch was normalized (in workers) while this one was read and classified
            for work in inflight:
                self._plan_normalized(segment, work)
            _submit(self._normalize, works, batch.columns, id_fields)
            inflight = works
            if self._progress:
                self._progress(ProgressEvent(segment, None, "reading", total, None))
        for work in inflight:
            self._plan_normalized(segment, work)
        for plan in plans:
            if plan.dropped:
                plan.seen[np.array(plan.dropped, dtype=np.int64)] = False
            plan.counts.source_rows = total
            if seg.mode == "mirror":
                # members on the platform who left; ledger rows never (or no longer) on it are cleaned up
                # too, but they are not removals from the audience (nor what the guardrail weighs)
                plan.counts.removes = int((~plan.seen & plan.index.on_platform).sum())
            if plan.spill:
                plan.spill.flush()

    def _classify_batch(
        self,
        seg: SegmentConfig,
        plan: _PairPlan,
        columns: Mapping[str, list[str | None]],
        karr: np.ndarray[Any, Any],
        farr: np.ndarray[Any, Any],
        valid_row: np.ndarray[Any, Any],
        dup: np.ndarray[Any, Any],
        looked_up: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    ) -> _Normalizing:
        """Count a batch's unchanged, duplicate and key-less rows; send the rest to normalization."""
        counts = plan.counts
        cls = classify(plan.index, karr, farr, looked_up)
        # a duplicate of a key the ledger knows: the second occurrence is a duplicate
        if len(plan.index):
            rows_found = np.flatnonzero(cls.found & valid_row)
            pos = cls.pos[rows_found]
            repeated = plan.seen[pos]  # seen in an earlier batch
            _, first = np.unique(pos, return_index=True)
            again = np.ones(len(pos), dtype=bool)
            again[first] = False  # or earlier in this batch: the first occurrence wins
            repeated |= again
            if repeated.any():
                dup = dup.copy()
                dup[rows_found[repeated]] = True
        counts.invalid += int((~valid_row).sum())
        if (~valid_row).any():
            counts.invalid_reasons["key_missing"] += int((~valid_row).sum())
        ndup = int((dup & valid_row).sum())
        if ndup:
            counts.invalid += ndup
            counts.invalid_reasons["duplicate_key"] += ndup
        todo = valid_row & ~dup
        counts.unchanged += int((todo & cls.unchanged).sum())
        # the first occurrence claims its member; one that turns out to have no payload is dropped
        # when the whole source has been read (then the member leaves the audience)
        plan.seen[cls.pos[todo & cls.found]] = True
        rows = np.flatnonzero(todo & ~cls.unchanged)
        pos = np.where(cls.found[rows], cls.pos[rows], -1)
        consent_cols = _consent_columns(seg)
        if plan.platform == "google" and consent_cols:
            per_row = [self._consent_of(seg, {c: columns[c][i] for c in consent_cols}) for i in rows.tolist()]
            consents = [encode_consent(c) for c in per_row]
            allowed = np.array([c.ad_user_data is not False for c in per_row], dtype=bool)
        else:
            fixed = self._consent_of(seg, {}) if plan.platform == "google" else None
            consents = [encode_consent(fixed)] * len(rows)
            allowed = np.full(len(rows), fixed is None or fixed.ad_user_data is not False, dtype=bool)
        if not allowed.all():
            counts.consent_denied += int((~allowed).sum())
            plan.dropped.extend(pos[~allowed & (pos >= 0)].tolist())
            rows, pos = rows[allowed], pos[allowed]
            consents = [c for c, ok in zip(consents, allowed.tolist(), strict=True) if ok]
        return _Normalizing(
            plan=plan,
            rows=rows,
            keys=hex_of_keys(karr[rows]),
            fps=farr[rows].tolist(),
            pos=pos.tolist(),
            consent=consents,
        )

    def _plan_normalized(self, segment: str, work: _Normalizing) -> None:
        """Stage the normalized rows of one batch: new members, changed members, invalid rows."""
        plan, counts = work.plan, work.plan.counts
        assert work.result is not None
        payloads, reasons = work.result()
        for reason, n in reasons.items():
            counts.invalid_reasons[reason] += n
        changed_found: list[int] = []  # rows of known members
        new: list[int] = []
        for j, payload in enumerate(payloads):
            if payload is None:
                counts.invalid += 1
                if work.pos[j] >= 0:
                    plan.dropped.append(work.pos[j])
            elif work.pos[j] >= 0:
                changed_found.append(j)
            else:
                new.append(j)
        counts.adds += len(new)
        self._stage(plan, work, payloads, new, known=False)
        if not changed_found:
            return
        known = self.ledger.payloads(segment, plan.name, [work.keys[j] for j in changed_found])
        resend: list[int] = []
        for j in changed_found:
            key, payload = work.keys[j], payloads[j]
            old = known.get(key)
            settled = old is not None and old[1] in (*ON_PLATFORM, "rejected")
            if settled and old is not None and old[0] == payload:
                # raw row changed (formatting, another column) but not what is sent
                counts.unchanged += 1
                plan.refresh.append((key, work.fps[j]))
                continue
            if old is not None and old[1] in ON_PLATFORM:
                counts.changes += 1
            else:
                counts.resends += 1
            resend.append(j)
        self._stage(plan, work, payloads, resend, known=True)

    @staticmethod
    def _stage(plan: _PairPlan, work: _Normalizing, payloads: list[str | None], rows: list[int], known: bool) -> None:
        """Put these rows of a batch (each with a payload) in the pair's spill, in one call."""
        if plan.spill and rows:
            plan.spill.add_many(
                [work.keys[j] for j in rows], [work.fps[j] for j in rows],
                cast(list[str], [payloads[j] for j in rows]), [work.consent[j] for j in rows], known,
            )  # fmt: skip

    # ------------------------------------------------------------------ pushing

    def _run_pair(self, segment: str, seg: SegmentConfig, plan: _PairPlan, opts: SyncOptions) -> RunResult:
        cfg = plan.config
        res = RunResult(segment, plan.name, plan.platform, "success", counts=plan.counts, sandbox=cfg.sandbox)
        pair = f"{segment} -> {plan.name}"
        try:
            max_share = seg.max_remove_share if seg.max_remove_share is not None else self.settings.max_remove_share
            check_guardrails(plan.counts, mode=seg.mode, max_remove_share=max_share, force=opts.force, pair=pair)
            full = opts.full_refresh or self._refresh_due(segment, plan)
            res.full_refresh = full
            if opts.dry_run:
                res.status = "dry_run"
                known = self.ledger.get_audience(segment, plan.name)
                res.audience_id = known.audience_id if known else None
                return res
            remove_keys = self._removal_keys(plan) if seg.mode == "mirror" else iter(())
            assert plan.spill is not None
            self.ledger.apply_plan(
                segment, plan.name, plan.spill.known(), remove_keys, plan.refresh,
                keep_removals=seg.mode == "mirror", journal=not full, new=plan.spill.new(),
            )  # fmt: skip
            plan.spill.close()
            plan.spill = None
            dest = self.destination(plan.name)
            audience = self._ensure_audience(segment, seg, plan, dest)
            res.audience_id = audience.audience_id
            ttl = cfg.membership_days if isinstance(cfg, GoogleDestinationConfig) else None
            if full:
                res.write_calls += self._replace(segment, plan.name, dest, audience, ttl)
            else:
                res.write_calls += self._push(segment, plan.name, dest, audience, ttl, res, plan.index)
            self._reconcile(segment, plan.name)
            self._lookalike(segment, seg, plan, dest, audience, res)
            self._read_status(segment, plan.name, dest, audience)
            res.rejected_reasons = self.ledger.rejected_reasons(segment, plan.name)
            res.rejected = sum(res.rejected_reasons.values())
        except GuardrailError as exc:
            res.status, res.error = "stopped", str(exc)
        except Interrupted as exc:
            res.status, res.error = "interrupted", f"{pair}: {exc}"
        except QuotaExhaustedError as exc:
            res.status = "failed"
            res.error = f"{pair}: quota exhausted, will retry on the next run: {exc}"
        except FatalError as exc:
            res.status, res.error = "failed", f"{pair}: {exc}"
        except DestinationError as exc:
            res.status, res.error = "failed", f"{pair}: gave up after retries: {exc}"
        except ConfigError as exc:
            res.status, res.error, res.error_kind = "failed", f"{pair}: {exc}", "config"
        except ConnectorError as exc:
            res.status, res.error = "failed", f"{pair}: {exc}"
        finally:
            if plan.spill:
                plan.spill.close()
            self.ledger.save_index(segment, plan.name)
        if res.error:
            log.error("%s", res.error)
        return res

    def _refresh_due(self, segment: str, plan: _PairPlan) -> bool:
        cfg = plan.config
        if not isinstance(cfg, MetaDestinationConfig) or not cfg.refresh_interval_days:
            return False
        rec = self.ledger.get_audience(segment, plan.name)
        if rec is None or rec.last_replace_at is None:
            return rec is not None  # never replaced yet: the first interval starts now
        return now() - rec.last_replace_at > timedelta(days=cfg.refresh_interval_days)

    def _removal_keys(self, plan: _PairPlan) -> Iterator[list[str]]:
        gone = plan.index.keys[~plan.seen]
        for i in range(0, len(gone), 10_000):
            # numpy's fixed-width bytes drop trailing NULs: pad back to 16 bytes before hex
            yield [b.ljust(16, b"\0").hex() for b in gone[i : i + 10_000].tolist()]

    def _ensure_audience(self, segment: str, seg: SegmentConfig, plan: _PairPlan, dest: Destination) -> AudienceRef:
        rec = self.ledger.get_audience(segment, plan.name)
        known = AudienceRef(rec.audience_id, rec.name, dict(rec.extra)) if rec else None
        name = rec.name if rec else f"connector: {segment}"
        aud = dest.ensure_audience(name, known, plan.normalizer.schema())
        if rec is None or aud.audience_id != rec.audience_id or aud.extra != rec.extra:
            self.ledger.save_audience(segment, plan.name, plan.platform, aud.audience_id, aud.name, aud.extra)
        return aud

    def _sessions(self, n_items: int, batch: int) -> Iterator[BatchSession]:
        n_batches = max(1, -(-n_items // batch))
        sid = int(time.time() * 1000) % (1 << 62)
        for seq in range(1, n_batches + 1):
            yield BatchSession(session_id=sid, seq=seq, last=seq == n_batches, estimated_total=n_items)
        while True:  # the ledger grew while we pushed; keep numbering
            seq += 1
            yield BatchSession(session_id=sid, seq=seq, last=True, estimated_total=n_items)

    def _push(self, segment: str, dest_name: str, dest: Destination, audience: AudienceRef,
              ttl: int | None, res: RunResult, index: LedgerIndex) -> int:  # fmt: skip
        size = dest.capabilities.max_batch_size
        n_remove, n_add = self.ledger.pending_counts(segment, dest_name)
        calls = sent = 0
        if n_remove:
            sessions = self._sessions(n_remove, size)
            for batch in self.ledger.iter_removals(segment, dest_name, size, index):
                self._check_stop()
                out = dest.remove_members(audience, to_members(batch), next(sessions))
                calls, sent = calls + 1, sent + len(batch)
                if self._progress:
                    self._progress(ProgressEvent(segment, dest_name, "sending", sent, n_remove + n_add))
                done = [p.key for p in batch if p.key not in out.deferred]
                self.ledger.commit_removals(segment, dest_name, done)
                if out.deferred:
                    res.deferred += len(out.deferred)
                    self.ledger.defer(segment, dest_name, out.deferred)
        if n_add:
            sessions = self._sessions(n_add, size)
            for batch in self.ledger.iter_additions(segment, dest_name, size):
                self._check_stop()
                out = dest.add_members(audience, to_members(batch), next(sessions))
                calls, sent = calls + 1, sent + len(batch)
                if self._progress:
                    self._progress(ProgressEvent(segment, dest_name, "sending", sent, n_remove + n_add))
                res.deferred += len(out.deferred)
                self.ledger.commit_additions(
                    segment, dest_name, [p.key for p in batch],
                    state="accepted" if out.pending else "confirmed", request_id=out.request_id,
                    rejected=out.rejected, deferred=out.deferred, ttl_days=ttl,
                    fresh=[p for p in batch if p.fresh],
                )  # fmt: skip
        if calls:
            dest.finish(audience)
            if self._progress:
                self._progress(ProgressEvent(segment, dest_name, "done", sent, n_remove + n_add))
        return calls

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("shutdown requested; committed batches are kept, the rest is sent on the next run")

    def _replace(self, segment: str, dest_name: str, dest: Destination, audience: AudienceRef,
                 ttl: int | None) -> int:  # fmt: skip
        self.ledger.plan_full_refresh(segment, dest_name)
        _, total = self.ledger.pending_counts(segment, dest_name)
        size = dest.capabilities.max_batch_size
        batches_sent = 0

        def batches() -> Iterator[list[Member]]:
            nonlocal batches_sent
            for batch in self.ledger.iter_present(segment, dest_name, size):
                batches_sent += 1
                yield to_members(batch)

        out = dest.replace_members(audience, batches(), total)
        self.ledger.commit_replace(segment, dest_name, "accepted" if out.pending else "confirmed",
                                   out.request_id, ttl)  # fmt: skip
        if out.rejected:
            self.ledger.resolve_request(segment, dest_name, out.request_id or "", "confirmed", None, out.rejected)
        return max(1, batches_sent)

    def _reconcile(self, segment: str, dest_name: str) -> None:
        ids = self.ledger.pending_requests(segment, dest_name)
        if not ids:
            return
        dest = self.destination(dest_name)
        rec = self.ledger.get_audience(segment, dest_name)
        if rec is None:
            return
        outcomes = dest.reconcile(AudienceRef(rec.audience_id, rec.name, dict(rec.extra)), ids)
        for rid, outcome in outcomes.items():
            if outcome.state == "succeeded":
                self.ledger.resolve_request(segment, dest_name, rid, "confirmed", None, outcome.rejected)
            elif outcome.state == "failed":
                log.warning("%s/%s: request failed on the platform (%s); members will be re-sent",
                            segment, dest_name, outcome.reason)  # fmt: skip
                self.ledger.resolve_request(segment, dest_name, rid, "planned", outcome.reason, outcome.rejected)

    def _lookalike(self, segment: str, seg: SegmentConfig, plan: _PairPlan, dest: Destination,
                   audience: AudienceRef, res: RunResult) -> None:  # fmt: skip
        spec_model = seg.lookalike.meta if plan.platform == "meta" else seg.lookalike.google
        if spec_model is None:
            return
        rec = self.ledger.get_audience(segment, plan.name)
        known = (
            LookalikeRef(rec.lookalike_id, rec.lookalike_state or "created", dict(rec.lookalike_details))
            if rec and rec.lookalike_id
            else None
        )
        counts = self.ledger.counts(segment, plan.name)
        seed = sum(counts.get(s, 0) for s in ON_PLATFORM)
        try:
            ref = dest.ensure_lookalike(audience, spec_model.model_dump(exclude_none=True), known, seed)
        except DestinationError as exc:
            res.status = "warning"
            res.warning = f"lookalike not created: {exc}"
            log.warning("%s -> %s: %s", segment, plan.name, res.warning)
            return
        if ref is None:
            res.lookalike_state = f"waiting for seed (>= {spec_model.min_seed_size} matched members)"
            return
        if not ref.lookalike_id:
            res.lookalike_state = ref.state  # not available for this destination; the reason is in the state
            return
        res.lookalike_id, res.lookalike_state = ref.lookalike_id, ref.state
        self.ledger.update_audience(
            segment, plan.name, lookalike_id=ref.lookalike_id, lookalike_state=ref.state,
            lookalike_details=ref.details,
        )  # fmt: skip

    def _read_status(self, segment: str, dest_name: str, dest: Destination, audience: AudienceRef) -> None:
        try:
            st = dest.audience_status(audience)
        except DestinationError as exc:
            log.warning("%s -> %s: could not read audience status: %s", segment, dest_name, exc)
            return
        self.ledger.update_audience(
            segment, dest_name,
            last_status={
                "size_lower": st.size_lower, "size_upper": st.size_upper, "match_rate": st.match_rate,
                "state": st.state, **st.details,
            },
            last_status_at=now(),
        )  # fmt: skip


__all__ = ["Engine", "RunResult", "SourceError", "SyncOptions"]
