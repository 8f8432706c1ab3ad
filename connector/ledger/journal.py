"""The control plane: a small transactional store beside the member files.

SQLite in `state_dir` by default, PostgreSQL when shared (any SQLAlchemy URL). Member rows never
come here: they live in each pair's Parquet files (`connector.ledger.files`). What does::

    pairs      (segment, destination) -> current base/delta files, version (compare-and-swap), counts
    runs       one row per run of a pair: trigger, status, counts, error
    batches    one row per acknowledged platform call: run, sequence number, request id, status
               (ok | pending: Google confirms later | failed: re-send its members)
    rejected   members a platform refused (key, reason), by run; `deferred` ones are retried
    audiences  the platform audience (and lookalike) of each pair

A run writes its pair's new member file first, then moves the pair's pointer in one transaction
(`move_pair`): that is the write-ahead point. Each acknowledged call is then one `batches` row
(`ack_batch`), so a crash leaves exactly the unacknowledged batches of the file to redo.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from connector.errors import LedgerError

# 8: members live in Parquet files per pair (pairs, batches, rejected); the `members` table is gone
SCHEMA_VERSION = 8

# the states `counts` reports that count as "on the platform" (accepted: Google confirms later)
ON_PLATFORM = ("accepted", "confirmed")

metadata = MetaData()

audiences = Table(
    "audiences",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("platform", String(20), nullable=False),
    Column("audience_id", String(200), nullable=False),
    Column("name", String(400), nullable=False),
    Column("extra", Text, nullable=False, default="{}"),
    Column("lookalike_id", String(200)),
    Column("lookalike_state", String(100)),
    Column("lookalike_details", Text),
    Column("last_replace_at", DateTime(timezone=True)),
    Column("last_status", Text),
    Column("last_status_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trigger", String(20), nullable=False),
    Column("segment", String(200), nullable=False),
    Column("destination", String(200), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Column("status", String(20), nullable=False),
    Column("dry_run", Integer, nullable=False, default=0),
    Column("counts", Text, nullable=False, default="{}"),
    Column("error", Text),
    Column("match_rate", Float),
)

pairs = Table(
    "pairs",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("base", String(300)),  # file names inside the pair's folder
    Column("delta", String(300)),
    Column("run_id", Integer),  # the run whose file is current (its batches are the ones in flight)
    Column("counts", Text, nullable=False, default="{}"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("run_id", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(10), nullable=False),  # add | remove | replace
    Column("rows", Integer, nullable=False),
    Column("request_id", String(300)),
    Column("status", String(10), nullable=False),  # ok | pending | failed
    Column("reason", String(300)),
    Column("acked_at", DateTime(timezone=True), nullable=False),
)

_INSERT_BATCH = insert(batches)  # one statement for every acknowledgement (its parameters bound per call)

rejected = Table(
    "rejected",
    metadata,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("run_id", Integer, primary_key=True, autoincrement=False),
    Column("member_key", String(32), primary_key=True),  # hex of the 16-byte key
    Column("reason", String(200), nullable=False),
    Column("deferred", Integer, nullable=False, default=0),  # refused for now: sent again next run
)

meta_table = Table(
    "ledger_meta",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", String(200), nullable=False),
)


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(slots=True)
class RunRecord:
    id: int
    trigger: str
    segment: str
    destination: str
    started_at: datetime
    ended_at: datetime | None
    status: str
    dry_run: bool
    counts: dict[str, Any]
    error: str | None
    match_rate: float | None = None


@dataclass(slots=True)
class AudienceRecord:
    segment: str
    destination: str
    platform: str
    audience_id: str
    name: str
    extra: dict[str, str]
    lookalike_id: str | None
    lookalike_state: str | None
    lookalike_details: dict[str, str]
    last_replace_at: datetime | None
    last_status: dict[str, Any] = field(default_factory=dict)
    last_status_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PairPointer:
    """Which member files are a pair's current state. `version` 0: the pair has none yet."""

    version: int = 0
    base: str | None = None
    delta: str | None = None
    run_id: int | None = None


@dataclass(frozen=True, slots=True)
class BatchAck:
    """What the platform said about one call, as the journal keeps it."""

    run_id: int
    seq: int
    kind: str
    rows: int
    request_id: str | None = None
    status: str = "ok"  # ok | pending | failed
    rejected: dict[str, str] = field(default_factory=dict)  # member key (hex) -> reason
    deferred: dict[str, str] = field(default_factory=dict)


class Journal:
    """The control plane on any SQLAlchemy database (SQLite file by default, PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, future=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            create_tables(metadata, self.engine)
            self._check_version()
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot open the ledger database ({type(exc).__name__})") from None

    def _check_version(self) -> None:
        for attempt in range(3):  # another process may be creating the same database right now
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema")).first()
                    if row is None:
                        conn.execute(insert(meta_table).values(key="schema", value=str(SCHEMA_VERSION)))
                        conn.execute(insert(meta_table).values(key="ledger_id", value=uuid.uuid4().hex))
                    elif int(row[0]) > SCHEMA_VERSION:
                        raise LedgerError(
                            f"the ledger was written by a newer connector (schema {row[0]} > {SCHEMA_VERSION})"
                        )
                    elif int(row[0]) < SCHEMA_VERSION:
                        self.legacy_schema = int(row[0])
                return
            except SQLAlchemyError:
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    legacy_schema: int | None = None

    def mark_current_schema(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(meta_table).where(meta_table.c.key == "schema").values(value=str(SCHEMA_VERSION)))
        self.legacy_schema = None

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ audiences

    def get_audience(self, segment: str, destination: str) -> AudienceRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(audiences).where(audiences.c.segment == segment, audiences.c.destination == destination)
            ).first()
        if row is None:
            return None
        m = row._mapping
        return AudienceRecord(
            segment=m["segment"],
            destination=m["destination"],
            platform=m["platform"],
            audience_id=m["audience_id"],
            name=m["name"],
            extra=json.loads(m["extra"] or "{}"),
            lookalike_id=m["lookalike_id"],
            lookalike_state=m["lookalike_state"],
            lookalike_details=json.loads(m["lookalike_details"] or "{}"),
            last_replace_at=aware(m["last_replace_at"]),
            last_status=json.loads(m["last_status"] or "{}"),
            last_status_at=aware(m["last_status_at"]),
        )

    def list_audiences(self) -> list[AudienceRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(audiences.c.segment, audiences.c.destination)).all()
        out = [self.get_audience(r[0], r[1]) for r in rows]
        return [a for a in out if a is not None]

    def save_audience(
        self, segment: str, destination: str, platform: str, audience_id: str, name: str, extra: dict[str, str],
        *, reset_lookalike: bool = False,
    ) -> None:  # fmt: skip
        values: dict[str, Any] = {
            "platform": platform, "audience_id": audience_id, "name": name,
            "extra": json.dumps(extra, sort_keys=True), "updated_at": now(),
        }  # fmt: skip
        if reset_lookalike:
            values.update(lookalike_id=None, lookalike_state=None, lookalike_details=None, last_replace_at=None)
        with self.engine.begin() as conn:
            done = conn.execute(
                update(audiences)
                .where(audiences.c.segment == segment, audiences.c.destination == destination)
                .values(**values)
            ).rowcount
            if not done:
                conn.execute(insert(audiences).values(segment=segment, destination=destination, **values))

    def update_audience(self, segment: str, destination: str, **values: Any) -> None:
        for k in ("lookalike_details", "last_status"):
            if k in values and not isinstance(values[k], str):
                values[k] = json.dumps(values[k], sort_keys=True)
        with self.engine.begin() as conn:
            conn.execute(
                update(audiences)
                .where(audiences.c.segment == segment, audiences.c.destination == destination)
                .values(updated_at=now(), **values)
            )

    # ------------------------------------------------------------------ pairs

    @staticmethod
    def _pair(table: Table, segment: str, destination: str) -> Any:
        return (table.c.segment == segment) & (table.c.destination == destination)

    def pointer(self, segment: str, destination: str) -> PairPointer:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(pairs.c.version, pairs.c.base, pairs.c.delta, pairs.c.run_id).where(
                    self._pair(pairs, segment, destination)
                )
            ).first()
        if row is None:
            return PairPointer()
        return PairPointer(int(row[0]), row[1], row[2], row[3])

    def move_pair(self, segment: str, destination: str, expected: PairPointer, base: str | None,
                  delta: str | None, run_id: int | None, *, forget: bool = False) -> PairPointer:  # fmt: skip
        """Point the pair at new member files, if nobody moved it since `expected` was read
        (compare-and-swap). `forget`: the pair starts over (its audience was recreated): its batches and
        rejections go too."""
        new = PairPointer(expected.version + 1, base, delta, run_id)
        with self._durable() as conn, conn.begin():
            if expected.version == 0:
                try:
                    conn.execute(insert(pairs).values(segment=segment, destination=destination, version=new.version,
                                                      base=base, delta=delta, run_id=run_id, counts="{}",
                                                      updated_at=now()))  # fmt: skip
                except SQLAlchemyError:
                    raise LedgerError(f"{segment} -> {destination}: another process changed this pair") from None
            else:
                done = conn.execute(
                    update(pairs)
                    .where(self._pair(pairs, segment, destination), pairs.c.version == expected.version)
                    .values(version=new.version, base=base, delta=delta, run_id=run_id, updated_at=now())
                ).rowcount
                if done != 1:
                    raise LedgerError(f"{segment} -> {destination}: another process changed this pair")
            if forget:
                conn.execute(delete(batches).where(self._pair(batches, segment, destination)))
                conn.execute(delete(rejected).where(self._pair(rejected, segment, destination)))
        return new

    @contextlib.contextmanager
    def _durable(self) -> Iterator[Connection]:
        """A connection whose next commit is on disk when it returns, power loss included. SQLite's WAL at
        synchronous=NORMAL (every other commit: an acknowledgement lost to a power cut only has its batch
        sent again) survives the process's crash but not the machine's; a pointer move is the write-ahead
        point, so it is synced (FULL) once per pair and run."""
        with self.engine.connect() as conn:
            sqlite = self.engine.dialect.name == "sqlite"
            if sqlite:
                conn.exec_driver_sql("PRAGMA synchronous=FULL")
                conn.commit()
            try:
                yield conn
            finally:
                if sqlite:
                    conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                    conn.commit()

    def set_counts(self, segment: str, destination: str, counts: dict[str, int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(pairs).where(self._pair(pairs, segment, destination)).values(counts=json.dumps(counts))
            )

    def counts(self, segment: str, destination: str) -> dict[str, int]:
        """Members of the pair by state (confirmed, accepted, rejected, planned), as of its last run."""
        with self.engine.connect() as conn:
            v = conn.execute(select(pairs.c.counts).where(self._pair(pairs, segment, destination))).scalar()
        return {str(k): int(n) for k, n in json.loads(v or "{}").items()}

    def all_pairs(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(select(pairs.c.segment, pairs.c.destination)).all()]

    # ------------------------------------------------------------------ batches

    def ack_batch(self, segment: str, destination: str, ack: BatchAck) -> None:
        """One acknowledged call, in one transaction with what the platform refused in it."""
        ts = now()
        with self.engine.begin() as conn:
            conn.execute(_INSERT_BATCH, {
                "segment": segment, "destination": destination, "run_id": ack.run_id, "seq": ack.seq, "kind": ack.kind,
                "rows": ack.rows, "request_id": ack.request_id, "status": ack.status, "acked_at": ts,
            })  # fmt: skip
            self._reject(conn, segment, destination, ack.run_id, ack.rejected, deferred=False)
            self._reject(conn, segment, destination, ack.run_id, ack.deferred, deferred=True)

    def _reject(self, conn: Any, segment: str, destination: str, run_id: int, reasons: dict[str, str],
                deferred: bool) -> None:  # fmt: skip
        if not reasons:
            return
        keys = list(reasons)
        # a member named twice (a later request status after the upload's own samples): the later word wins
        conn.execute(delete(rejected).where(
            self._pair(rejected, segment, destination), rejected.c.run_id == run_id, rejected.c.member_key.in_(keys)
        ))  # fmt: skip
        conn.execute(insert(rejected), [
            {"segment": segment, "destination": destination, "run_id": run_id, "member_key": k,
             "reason": why[:200], "deferred": int(deferred)}
            for k, why in reasons.items()
        ])  # fmt: skip

    def acks(self, segment: str, destination: str) -> pa.Table:
        """The pair's acknowledged batches as columns (run, b, ok, acked_at) for the member files' joins.
        `ok`: the platform has (or will have, once Google confirms) the batch's members; a failed request
        is not ok, so its members are sent again."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(batches.c.run_id, batches.c.seq, batches.c.status, batches.c.acked_at).where(
                    self._pair(batches, segment, destination)
                )
            ).all()
        return pa.table({
            "run": pa.array([int(r[0]) for r in rows], pa.uint32()),
            "b": pa.array([int(r[1]) for r in rows], pa.int32()),
            "ok": pa.array([r[2] != "failed" for r in rows], pa.bool_()),
            "pending": pa.array([r[2] == "pending" for r in rows], pa.bool_()),
            "acked_at": pa.array([aware(r[3]) for r in rows], pa.timestamp("us", tz="UTC")),
        })  # fmt: skip

    def rejections(self, segment: str, destination: str) -> pa.Table:
        """Members the platform refused, by the run that sent them: (k, run, deferred)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(rejected.c.member_key, rejected.c.run_id, rejected.c.deferred).where(
                    self._pair(rejected, segment, destination)
                )
            ).all()
        return pa.table({
            "k": pa.array([bytes.fromhex(r[0]) for r in rows], pa.binary()),
            "run": pa.array([int(r[1]) for r in rows], pa.uint32()),
            "deferred": pa.array([bool(r[2]) for r in rows], pa.bool_()),
        })  # fmt: skip

    def rejected_reasons(self, segment: str, destination: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(rejected.c.reason, func.count())
                .where(self._pair(rejected, segment, destination), rejected.c.deferred == 0)
                .group_by(rejected.c.reason)
            ).all()
        return {str(r): int(n) for r, n in rows}

    def pending_requests(self, segment: str, destination: str) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(batches.c.request_id)
                .where(self._pair(batches, segment, destination), batches.c.status == "pending",
                       batches.c.request_id.is_not(None))
                .distinct()
            ).all()  # fmt: skip
        return [str(r[0]) for r in rows]

    def resolve_request(self, segment: str, destination: str, request_id: str, ok: bool, reason: str | None,
                        rejected_keys: dict[str, str]) -> None:  # fmt: skip
        """A polled request finished: its batches become ok (members confirmed) or failed (sent again)."""
        with self.engine.begin() as conn:
            runs_of = conn.execute(
                select(batches.c.run_id)
                .where(self._pair(batches, segment, destination), batches.c.request_id == request_id)
                .distinct()
            ).all()
            conn.execute(
                update(batches)
                .where(self._pair(batches, segment, destination), batches.c.request_id == request_id,
                       batches.c.status == "pending")
                .values(status="ok" if ok else "failed", reason=(reason or None) and reason[:300])
            )  # fmt: skip
            if rejected_keys and runs_of:
                self._reject(conn, segment, destination, int(runs_of[-1][0]), rejected_keys, deferred=False)

    def forget_batches(self, segment: str, destination: str, before_run: int) -> None:
        """Batches and rejections of runs a compaction folded into the pair's base (their members' states
        are in the file now)."""
        with self.engine.begin() as conn:
            conn.execute(delete(batches).where(self._pair(batches, segment, destination), batches.c.run_id <= before_run,
                                               batches.c.status != "pending"))  # fmt: skip
            conn.execute(delete(rejected).where(self._pair(rejected, segment, destination), rejected.c.run_id <= before_run))

    # ------------------------------------------------------------------ runs

    def start_run(self, trigger: str, segment: str, destination: str, dry_run: bool, status: str = "running") -> int:
        with self.engine.begin() as conn:
            res = conn.execute(
                insert(runs).values(
                    trigger=trigger, segment=segment, destination=destination, started_at=now(),
                    status=status, dry_run=int(dry_run), counts="{}",
                )
            )
            pk = res.inserted_primary_key
            assert pk is not None
            return int(pk[0])

    def mark_running(self, run_id: int) -> None:
        """A queued run (created when its trigger arrived) starts now."""
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(status="running", started_at=now()))

    def finish_run(self, run_id: int, status: str, counts: dict[str, Any], error: str | None,
                   match_rate: float | None = None) -> None:  # fmt: skip
        with self.engine.begin() as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(status=status, ended_at=now(), counts=json.dumps(counts, sort_keys=True), error=error,
                        match_rate=match_rate)
            )  # fmt: skip

    def list_runs(self, limit: int = 50) -> list[RunRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
        return [
            RunRecord(
                id=r.id, trigger=r.trigger, segment=r.segment, destination=r.destination,
                started_at=aware(r.started_at) or now(), ended_at=aware(r.ended_at),
                status=r.status, dry_run=bool(r.dry_run), counts=json.loads(r.counts or "{}"),
                error=r.error, match_rate=r.match_rate,
            )
            for r in rows
        ]

    def last_success(self, segment: str, destination: str) -> datetime | None:
        with self.engine.connect() as conn:
            v = conn.execute(
                select(func.max(runs.c.ended_at)).where(
                    runs.c.segment == segment, runs.c.destination == destination, runs.c.status == "success",
                    runs.c.dry_run == 0,
                )
            ).scalar()  # fmt: skip
        return aware(v)


def create_tables(meta: MetaData, engine: Engine) -> None:
    """create_all, tolerant of another process creating the same tables at the same moment."""
    for attempt in range(3):
        try:
            meta.create_all(engine)
            return
        except SQLAlchemyError:
            if attempt == 2:
                raise
            time.sleep(0.1 * (attempt + 1))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets `status` read while a sync writes; at NORMAL a commit survives the process's crash, and the
    # pointer moves are synced in full (`Journal._durable`)
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


__all__ = [
    "ON_PLATFORM",
    "AudienceRecord",
    "BatchAck",
    "Journal",
    "PairPointer",
    "RunRecord",
    "create_tables",
    "now",
]

