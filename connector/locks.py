"""Cross-process coordination kept in the ledger database: pair locks with leases, the queue of
pending syncs, and the webhook replay memory. Works on SQLite and PostgreSQL alike.

A lock is a row (segment, destination) -> holder, lease expiry. Acquiring is one conditional write
in one transaction: insert the row, or take it over when its lease expired (its holder died) or
when we already hold it. While held, a heartbeat thread renews the lease, so a live holder never
loses it and a dead one frees it after `lease_seconds`.

Every expiry, cutoff and wait reads the injected `Clock` (the system clock by default), so tests move
time forward instead of sleeping through a lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Column, DateTime, MetaData, String, Table, Text, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from connector.clock import SYSTEM_CLOCK, Clock
from connector.errors import LockHeldError
from connector.ledger.journal import Journal, create_tables

log = logging.getLogger("connector.locks")

coordination = MetaData()
locks = Table(
    "locks", coordination,
    Column("segment", String(200), primary_key=True),
    Column("destination", String(200), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)  # fmt: skip
queued = Table(
    "queued", coordination,
    Column("segment", String(200), primary_key=True),
    Column("destinations", Text, nullable=False),  # JSON list, or "null" for all
    Column("run_ids", Text, nullable=False, default="{}"),  # destination -> queued run id
    Column("trigger", String(20), nullable=False),
    Column("queued_at", DateTime(timezone=True), nullable=False),
)  # fmt: skip
webhook_events = Table(
    "webhook_events", coordination,
    Column("key", String(200), primary_key=True),
    Column("seen_at", DateTime(timezone=True), nullable=False),
)  # fmt: skip


def _pid_namespace() -> str | None:
    """Which pid space our pids live in: this boot of this machine and this pid namespace (two
    containers, or two machines, can share a host name; they never share this)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        ns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return None
    return f"{boot.replace('-', '')[:12]}.{ns}"


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{_pid_namespace() or '-'}"


def holder_is_dead(holder: str) -> bool:
    """True only when the holder ran in our pid space (same machine, boot and pid namespace) and its
    process no longer exists. Any other holder, or a pid that is alive (perhaps reused), is treated as
    alive: its lease decides."""
    parts = holder.split(":")
    here = _pid_namespace()
    if len(parts) != 4 or here is None or parts[0] != socket.gethostname() or parts[3] != here:
        return False
    if not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # a zombie (killed, not yet reaped by its parent) still answers kill(pid, 0)
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return False


class Coordinator:
    def __init__(self, ledger: Journal, *, lease_seconds: float = 60.0, holder: str | None = None,
                 clock: Clock | None = None) -> None:  # fmt: skip
        self.ledger = ledger
        self.clock = clock or SYSTEM_CLOCK
        self.engine = ledger.engine
        self.lease = timedelta(seconds=lease_seconds)
        self.holder = holder or holder_id()
        create_tables(coordination, self.engine)

    # ------------------------------------------------------------------ locks

    def try_acquire(self, segment: str, destination: str) -> str | None:
        """Take the lock; None on success, else the current holder."""
        ts = self.clock.now()
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(insert(locks).values(segment=segment, destination=destination, holder=self.holder,
                                                      expires_at=ts + self.lease))  # fmt: skip
                return None
            except IntegrityError:
                pass
            taken = conn.execute(
                update(locks)
                .where(locks.c.segment == segment, locks.c.destination == destination,
                       or_(locks.c.expires_at < ts, locks.c.holder == self.holder))
                .values(holder=self.holder, expires_at=ts + self.lease)
            ).rowcount  # fmt: skip
            if taken:
                return None
            row = conn.execute(select(locks.c.holder).where(locks.c.segment == segment,
                                                             locks.c.destination == destination)).first()  # fmt: skip
            holder = str(row[0]) if row else "unknown"
            if row and holder_is_dead(holder):
                # the holder ran on this machine and its process is gone (killed): no need to wait for the lease
                taken = conn.execute(
                    update(locks)
                    .where(locks.c.segment == segment, locks.c.destination == destination, locks.c.holder == holder)
                    .values(holder=self.holder, expires_at=ts + self.lease)
                ).rowcount  # fmt: skip
                if taken:
                    log.warning("%s -> %s: lock holder %s is no longer running; taking over", segment, destination,
                                holder)  # fmt: skip
                    return None
            return holder

    def renew(self, pairs: list[tuple[str, str]]) -> None:
        with self.engine.begin() as conn:
            for seg, dest in pairs:
                mine = (locks.c.segment == seg, locks.c.destination == dest, locks.c.holder == self.holder)
                conn.execute(update(locks).where(*mine).values(expires_at=self.clock.now() + self.lease))

    def release(self, segment: str, destination: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(locks).where(locks.c.segment == segment, locks.c.destination == destination,
                                             locks.c.holder == self.holder))  # fmt: skip

    def holders(self) -> dict[tuple[str, str], tuple[str, datetime]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(locks)).all()
        return {(r.segment, r.destination): (r.holder, r.expires_at) for r in rows}

    def pair_lock(self, *, wait: bool = True, timeout: float | None = None,
                  on_wait: Callable[[str, str, str], None] | None = None) -> Callable[[str, str], object]:  # fmt: skip
        """A `PairLock` for the engine: waits for a busy pair (or raises LockHeldError if not `wait`)."""

        @contextmanager
        def lock(segment: str, destination: str) -> Iterator[None]:
            started = self.clock.monotonic()
            announced = False
            while (who := self.try_acquire(segment, destination)) is not None:
                if not wait or (timeout is not None and self.clock.monotonic() - started > timeout):
                    raise LockHeldError(
                        f"{segment} -> {destination} is being synced by {who}; try again later or drop --no-wait",
                        holder=who,
                    )
                if on_wait and not announced:
                    on_wait(segment, destination, who)
                    announced = True
                self.clock.sleep(0.5)
            stop = threading.Event()
            beat = threading.Thread(target=self._heartbeat, args=([(segment, destination)], stop), daemon=True)
            beat.start()
            try:
                yield
            finally:
                stop.set()
                beat.join(timeout=5)
                self.release(segment, destination)

        return lock

    def _heartbeat(self, pairs: list[tuple[str, str]], stop: threading.Event) -> None:
        interval = max(0.2, self.lease.total_seconds() / 3)
        while not stop.wait(interval):
            try:
                self.renew(pairs)
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease covers two more
                log.warning("lock renewal failed; retrying")

    # ------------------------------------------------------------------ queue

    def enqueue(self, segment: str, destinations: list[str] | None, trigger: str,
                all_destinations: list[str] | None = None) -> tuple[bool, dict[str, int]]:  # fmt: skip
        """Queue a sync. Returns (new, run ids by destination): a trigger that arrives while a sync of the
        segment is queued joins it (destinations merged) and gets the same run ids."""
        targets = destinations or all_destinations or []
        with self.engine.begin() as conn:
            row = conn.execute(select(queued).where(queued.c.segment == segment)).first()
            run_ids: dict[str, int] = json.loads(row.run_ids) if row is not None else {}
            for dest in targets:
                if dest not in run_ids:
                    run_ids[dest] = self.ledger.start_run(trigger, segment, dest, False, status="queued")
            if row is None:
                conn.execute(insert(queued).values(segment=segment, destinations=json.dumps(destinations),
                                                   run_ids=json.dumps(run_ids), trigger=trigger,
                                                   queued_at=self.clock.now()))  # fmt: skip
                return True, run_ids
            old = json.loads(row.destinations)
            merged = None if old is None or destinations is None else sorted(set(old) | set(destinations))
            conn.execute(update(queued).where(queued.c.segment == segment)
                         .values(destinations=json.dumps(merged), run_ids=json.dumps(run_ids)))  # fmt: skip
            return False, run_ids

    def pop(self, settle_seconds: float = 0.0) -> tuple[str, list[str] | None, str, dict[str, int]] | None:
        """The oldest queued sync that has waited `settle_seconds` (a burst of triggers settles into one)."""
        cutoff = self.clock.now() - timedelta(seconds=settle_seconds)
        with self.engine.begin() as conn:
            row = conn.execute(
                select(queued).where(queued.c.queued_at <= cutoff).order_by(queued.c.queued_at).limit(1)
            ).first()
            if row is None:
                return None
            conn.execute(delete(queued).where(queued.c.segment == row.segment))
            ids = {str(k): int(v) for k, v in json.loads(row.run_ids or "{}").items()}
            return str(row.segment), json.loads(row.destinations), str(row.trigger), ids

    def pending(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(queued.c.segment).order_by(queued.c.queued_at))]

    # ------------------------------------------------------------------ webhook replays

    def seen_before(self, key: str, keep: timedelta) -> bool:
        """Remember `key`; True if it was seen within `keep` (a replay)."""
        ts = self.clock.now()
        with self.engine.begin() as conn:
            conn.execute(delete(webhook_events).where(webhook_events.c.seen_at < ts - keep))
            try:
                with conn.begin_nested():
                    conn.execute(insert(webhook_events).values(key=key[:200], seen_at=ts))
                return False
            except IntegrityError:
                return True


__all__ = ["Coordinator", "holder_id"]
