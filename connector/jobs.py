"""Syncs as jobs on PostgreSQL (procrastinate): `connector serve` enqueues, `connector worker` runs them.

With ``[workers] url = "postgresql://..."`` every sync is a procrastinate job of task `SYNC_TASK`, and
procrastinate's own mechanisms do the coordination (nothing home-made):

- **queueing lock** ``connector:segment:<name>``: while a sync of the segment waits in the queue, another
  trigger joins it instead of queueing a second one (a webhook asking for more destinations widens it);
- **lock** ``connector:segment:<name>``: jobs of one segment run one at a time across all workers, so no
  (segment, destination) pair is ever synced by two workers at once (a segment's pairs are synced together:
  the source is read once);
- **periodic tasks**: one per segment with a ``schedule`` (periodic id = the segment); every worker runs the
  deferrer and procrastinate's periodic-defer table lets exactly one defer through per tick. Schedules are
  evaluated in UTC here (procrastinate's cron), whatever ``timezone`` says;
- **retries**: a sync that raised is retried with exponential backoff (`SyncRetry`); a worker that died
  (no heartbeat for ``stalled_after_seconds``) has its job put back in the queue by any live worker
  (`retry_stalled_jobs`); the next job of the segment closes the runs it left "running" as failed;
- the **job table** is the queue: `JobQueue.pending` lists the segments waiting.

The journal's pair leases (`connector.locks`) are still taken around each sync, so a manual `connector
sync` and the workers never sync the same pair at once either. Without ``[workers]`` none of this is
imported: the embedded mode of `connector serve` runs as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from procrastinate import App, BaseRetryStrategy, JobContext, PsycopgConnector, RetryDecision, builtin_tasks
from procrastinate.exceptions import AlreadyEnqueued, ProcrastinateException, UniqueViolation
from procrastinate.jobs import Job, Status
from procrastinate.schema import SchemaManager
from procrastinate.types import JSONValue
from sqlalchemy import update

from connector.engine import DestinationFactory, Engine, RunResult, SyncOptions
from connector.errors import ConfigError, ConnectorError
from connector.ledger.journal import Journal, aware, now, runs
from connector.locks import Coordinator, holder_is_dead
from connector.settings import ConnectorSettings, WorkersConfig

log = logging.getLogger("connector.jobs")

SYNC_TASK = "connector.sync_segment"
SCHEDULED_TASK = "connector.scheduled_sync"


class SyncInterrupted(ConnectorError):
    """The worker is stopping: the batch in flight was committed; the job goes back to the queue."""


def segment_lock(segment: str) -> str:
    return f"connector:segment:{segment}"


def conninfo(workers: WorkersConfig) -> str:
    """The queue's URL as psycopg wants it (a SQLAlchemy driver suffix such as +psycopg dropped)."""
    url = workers.url.get_secret_value()
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+')[0]}{sep}{rest}"


class SyncRetry(BaseRetryStrategy):
    """Backoff doubling from `backoff_seconds`, `max_attempts` tries in all; a configuration mistake is
    not retried (it fails the same way until someone fixes the config)."""

    def __init__(self, max_attempts: int, backoff_seconds: float) -> None:
        self.max_attempts = max_attempts
        self.backoff = backoff_seconds

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, ConfigError) or job.attempts + 1 >= self.max_attempts:
            return None
        return RetryDecision(retry_in={"seconds": max(1, round(self.backoff * 2**job.attempts))})


def poll_seconds(settings: ConnectorSettings) -> float:
    """How often an idle worker looks for jobs that have become due. procrastinate notifies the workers when a
    job is queued, but a webhook's job is only due `webhook_debounce_seconds` later (a retry after its
    backoff): then only polling finds it. Half the debounce, between 0.5 and 5 seconds (procrastinate's
    default, 5 s, made an idle queue start a webhook's sync about 5 s after it arrived)."""
    return min(5.0, max(0.5, settings.webhook_debounce_seconds / 2))


def _quiet_procrastinate() -> None:
    """procrastinate logs every defer and periodic tick at INFO: keep its warnings unless debugging."""
    logging.getLogger("procrastinate").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))


def ensure_schema(workers: WorkersConfig) -> None:
    """Create procrastinate's tables on first use (one process does it; the others wait for it)."""
    import psycopg

    with psycopg.connect(conninfo(workers), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('connector:procrastinate-schema'))")
        try:
            row = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if row is None or row[0] is None:
                log.info("creating the job queue's tables (procrastinate schema)")
                conn.execute(SchemaManager.get_schema())
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('connector:procrastinate-schema'))")


Runner = Callable[[str, list[str] | None, str, dict[str, int], int], list[RunResult]]


def build_app(settings: ConnectorSettings, runner: Callable[[], Runner] | None = None) -> App:
    """The procrastinate app of `settings`: the sync task and one periodic task per scheduled segment.
    `runner` (workers only) gives the function that runs a sync; `serve` only defers."""
    cfg = settings.workers
    if cfg is None:
        raise ConfigError("the job queue needs a [workers] table with url = \"postgresql://...\"")
    _quiet_procrastinate()
    app = App(connector=PsycopgConnector(conninfo=conninfo(cfg)))

    def sync_segment(context: JobContext, segment: str, destinations: list[str] | None = None,
                     trigger: str = "webhook", run_ids: dict[str, int] | None = None) -> dict[str, str]:  # fmt: skip
        if runner is None:
            raise ConfigError("this process only enqueues syncs; run `connector worker` to run them")
        if segment not in settings.segments:
            raise ConfigError(f"unknown segment {segment!r} (queued before the config changed?)")
        attempts = context.job.attempts if context.job else 0
        results = runner()(segment, destinations, trigger, dict(run_ids or {}), attempts)
        if any(r.status == "interrupted" for r in results):
            raise SyncInterrupted(f"{segment}: stopped mid-sync; queued again")
        return {f"{r.segment} -> {r.destination}": r.status for r in results}

    def scheduled_sync(context: JobContext, timestamp: int, segment: str) -> dict[str, str]:
        # `timestamp`: the schedule's tick, which procrastinate defers once however many workers run
        return sync_segment(context, segment, None, "schedule", None)

    retry = SyncRetry(cfg.max_attempts, cfg.backoff_seconds)
    app.task(name=SYNC_TASK, queue=cfg.queue, pass_context=True, retry=retry)(sync_segment)
    scheduled = app.task(name=SCHEDULED_TASK, queue=cfg.queue, pass_context=True, retry=retry)(scheduled_sync)

    async def remove_old_jobs(context: JobContext, timestamp: int) -> None:
        # finished jobs stay in the job table (the run queue's history) for keep_jobs_hours
        await builtin_tasks.remove_old_jobs(context, max_hours=cfg.keep_jobs_hours, queue=cfg.queue, remove_failed=True,
                                            remove_cancelled=True, remove_aborted=True)  # fmt: skip

    cleanup = app.task(name="connector.remove_old_jobs", queue=cfg.queue, pass_context=True,
                       queueing_lock="connector:remove_old_jobs")(remove_old_jobs)  # fmt: skip
    app.periodic(cron="17 * * * *", periodic_id="cleanup")(cleanup)
    for name, seg in settings.segments.items():
        if seg.schedule:
            app.periodic(cron=seg.schedule, periodic_id=name, lock=segment_lock(name), queueing_lock=segment_lock(name),
                         task_kwargs={"segment": name})(scheduled)  # fmt: skip
    return app


class JobQueue:
    """What `connector serve` needs of the queue: enqueue a segment's sync, list what waits."""

    def __init__(self, settings: ConnectorSettings, journal: Journal) -> None:
        assert settings.workers is not None
        self.settings = settings
        self.journal = journal
        self.app = build_app(settings)

    def open(self) -> None:
        assert self.settings.workers is not None
        _quiet_procrastinate()
        ensure_schema(self.settings.workers)
        self.app.open()

    def close(self) -> None:
        self.app.close()

    def _queued(self, segment: str) -> Job | None:
        jobs = self.app.job_manager.list_jobs(queueing_lock=segment_lock(segment), status=Status.TODO.value)
        return jobs[0] if jobs else None

    def enqueue(self, segment: str, destinations: list[str] | None, trigger: str) -> tuple[bool, dict[str, int]]:
        """Queue a sync of `segment` (None: all its destinations). Returns (new, run ids by destination): a
        trigger arriving while a sync of the segment waits joins it (same run ids)."""
        everyone = self.settings.segments[segment].destinations
        created: dict[str, int] = {}
        for _ in range(20):  # each turn loses a race to another enqueuer or a worker taking the job
            queued = self._queued(segment)
            run_ids: dict[str, int] = {}
            wanted = destinations
            if queued is not None:
                kw = queued.task_kwargs
                have = kw.get("destinations")
                old_ids = {str(k): int(v) for k, v in dict(kw.get("run_ids") or {}).items()}  # type: ignore[arg-type]
                if have is None or set(destinations or everyone) <= set(have):  # type: ignore[arg-type]
                    self._drop(created, "joined a sync already queued")
                    return False, old_ids
                # it waits for fewer destinations than asked: widen it (cancel works only while it still waits)
                assert queued.id is not None
                if not self.app.job_manager.cancel_job_by_id(queued.id):
                    continue
                wanted = None if destinations is None else sorted(set(have) | set(destinations))  # type: ignore[arg-type]
                run_ids = old_ids
                # its runs are ours now: reused by the widened job, or closed if we end up joining another
                created.update({d: i for d, i in old_ids.items() if d not in created})
            for dest in wanted or everyone:
                if dest not in run_ids:
                    if dest not in created:
                        created[dest] = self.journal.start_run(trigger, segment, dest, False, status="queued")
                    run_ids[dest] = created[dest]
            try:
                self.app.configure_task(
                    SYNC_TASK, queue=self.settings.workers.queue if self.settings.workers else None,
                    lock=segment_lock(segment), queueing_lock=segment_lock(segment),
                    # a burst of triggers settles into the one queued job (it waits webhook_debounce_seconds)
                    schedule_in={"seconds": self.settings.webhook_debounce_seconds},
                ).defer(**_json({"segment": segment, "destinations": wanted, "trigger": trigger, "run_ids": run_ids}))
            except AlreadyEnqueued:
                continue
            return queued is None, run_ids
        raise ConnectorError(f"{segment}: could not queue a sync (the queue kept changing); try again")

    def _drop(self, run_ids: dict[str, int], why: str) -> None:
        for rid in run_ids.values():
            self.journal.finish_run(rid, "coalesced", {}, why)

    def _sync_jobs(self, status: Status) -> list[Job]:
        """Sync jobs (webhook or schedule) of our queue in `status`, oldest first."""
        assert self.settings.workers is not None
        jobs = self.app.job_manager.list_jobs(queue=self.settings.workers.queue, status=status.value)
        return [j for j in jobs if j.task_name in (SYNC_TASK, SCHEDULED_TASK) and j.task_kwargs.get("segment")]

    def pending(self) -> list[str]:
        return sorted({str(j.task_kwargs["segment"]) for j in self._sync_jobs(Status.TODO)})

    def jobs(self) -> list[QueuedJob]:
        """The run queue as `status` and `runs` show it: sync jobs waiting, waiting for a retry, or running,
        from procrastinate's job table (oldest first)."""
        cfg = self.settings.workers
        assert cfg is not None
        db = self.app.connector.get_sync_connector()
        found = sorted(self._sync_jobs(Status.TODO) + self._sync_jobs(Status.DOING), key=lambda j: j.id or 0)
        if not found:
            return []
        # when each job was queued and last started: procrastinate's event log (its manager has no reader)
        events = {int(r["job_id"]): r for r in db.execute_query_all(query=_JOB_EVENTS, ids=[j.id for j in found])}
        holders = Coordinator(self.journal).holders()
        out = []
        for j in found:
            assert j.id is not None
            segment = str(j.task_kwargs["segment"])
            running = j.status == Status.DOING.value
            dests = j.task_kwargs.get("destinations")
            # the process syncing it: the journal's pair leases name it (host:pid), procrastinate only an id
            leases = sorted({":".join(h.split(":")[:2]) for (seg, _), (h, _) in holders.items() if seg == segment})
            ev = events.get(j.id, {})
            out.append(QueuedJob(
                job_id=j.id, segment=segment, destinations=[str(d) for d in dests] if isinstance(dests, list) else None,
                trigger="schedule" if j.task_name == SCHEDULED_TASK else str(j.task_kwargs.get("trigger") or "webhook"),
                state="running" if running else "retrying" if j.attempts else "queued", attempt=j.attempts + 1,
                max_attempts=cfg.max_attempts,
                queued_at=aware(ev.get("queued_at")), due_at=None if running else aware(j.scheduled_at),
                started_at=aware(ev.get("started_at")) if running else None, worker_id=j.worker_id if running else None,
                worker=(", ".join(leases) or None) if running else None,
            ))  # fmt: skip
        return out


def read_queue(settings: ConnectorSettings, journal: Journal) -> list[QueuedJob]:
    """`JobQueue.jobs` for a one-off reader (`connector status`, `connector runs`)."""
    import psycopg

    assert settings.workers is not None
    try:
        # first a connection of our own: it fails at once (procrastinate's pool would wait 30 s for one), and
        # tells whether any process created the queue's tables yet (reading creates nothing)
        with psycopg.connect(conninfo(settings.workers), connect_timeout=10) as conn:
            row = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
        if row is None or row[0] is None:
            return []
        queue = JobQueue(settings, journal)
        with queue.app.open():
            return queue.jobs()
    except (ProcrastinateException, psycopg.Error, OSError) as exc:
        # the message may name the server; the URL is a secret
        raise ConnectorError(f"could not read the job queue at [workers] url ({type(exc).__name__}): is PostgreSQL "
                             "reachable?") from None  # fmt: skip


_JOB_EVENTS = """
SELECT job_id, min(at) FILTER (WHERE type = 'deferred') AS queued_at, max(at) FILTER (WHERE type = 'started') AS started_at
  FROM procrastinate_events WHERE job_id = ANY(%(ids)s) GROUP BY job_id
"""


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """One sync job of the run queue. `attempt` is the try running or next to run (1 = the first)."""

    job_id: int
    segment: str
    destinations: list[str] | None  # None: all the segment's destinations
    trigger: str  # webhook or schedule
    state: Literal["queued", "running", "retrying"]  # retrying: a try failed, the next waits for its backoff
    attempt: int
    max_attempts: int
    queued_at: datetime | None  # when the first trigger queued it
    due_at: datetime | None  # not started before (the debounce, or a retry's backoff); None while running
    started_at: datetime | None  # when its running try started
    worker_id: int | None  # procrastinate's id of the worker running it
    worker: str | None  # host:pid of the process syncing its pairs (the journal's leases)

    def as_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}


def _json(kwargs: dict[str, Any]) -> dict[str, JSONValue]:
    return kwargs


# ---------------------------------------------------------------------- worker


def close_stale_runs(journal: Journal, coord: Coordinator, segment: str, destinations: list[str], keep: set[int]) -> int:
    """Runs of `segment` that a dead worker left "running" are closed as failed. Called with the segment's
    job lock held (no other job of it runs); a pair whose journal lease is held by a live process (a
    manual `connector sync`) is left alone."""
    held = coord.holders()
    n = 0
    with journal.engine.begin() as conn:
        for dest in destinations:
            holder = held.get((segment, dest))
            if holder is not None and (aware(holder[1]) or now()) > now() and not holder_is_dead(holder[0]):
                continue
            res = conn.execute(
                update(runs).where(runs.c.segment == segment, runs.c.destination == dest, runs.c.status == "running",
                                   runs.c.id.notin_(keep or {-1}))
                .values(status="failed", ended_at=now(), error="its worker stopped mid-sync; the sync ran again")
            )  # fmt: skip
            n += int(res.rowcount or 0)
    return n


class Worker:
    """One `connector worker` process: one engine, one sync at a time."""

    def __init__(self, settings: ConnectorSettings, *, destination_factory: DestinationFactory | None = None,
                 name: str | None = None) -> None:  # fmt: skip
        assert settings.workers is not None
        self.settings = settings
        self.cfg = settings.workers
        self.name = name
        self.stop = threading.Event()
        self.journal = Journal(settings.ledger_sqlalchemy_url())
        self.coord = Coordinator(self.journal, lease_seconds=max(60.0, self.cfg.stalled_after_seconds))
        self.engine = Engine(settings, ledger=self.journal, destination_factory=destination_factory,
                             pair_lock=self.coord.pair_lock(wait=True), stop=self.stop)  # type: ignore[arg-type]
        self.app = build_app(settings, runner=lambda: self.run_sync)

    def run_sync(self, segment: str, destinations: list[str] | None, trigger: str, run_ids: dict[str, int],
                 attempts: int) -> list[RunResult]:  # fmt: skip
        if attempts:
            run_ids = {}  # the first attempt used the queued runs: a retry records runs of its own
        closed = close_stale_runs(self.journal, self.coord, segment, self.settings.segments[segment].destinations,
                                  set(run_ids.values()))  # fmt: skip
        if closed:
            log.warning("%s: closed %d run(s) a stopped worker left open; syncing it again", segment, closed)
        log.info("run start: %s (trigger %s, attempt %d%s)", segment, trigger, attempts + 1,
                 f", worker {self.name}" if self.name else "")  # fmt: skip
        opts = SyncOptions(trigger=trigger, destinations=frozenset(destinations) if destinations else None,
                           run_ids=run_ids or None)  # fmt: skip
        results = self.engine.sync([segment], opts)
        for r in results:
            c = r.counts
            log.info("run end: %s -> %s %s (run %s): %s adds, %s removes, %s unchanged in %.1f s", r.segment,
                     r.destination, r.status, r.run_id, f"{c.adds + c.changes:,}", f"{c.removes + c.changes:,}",
                     f"{c.unchanged:,}", r.seconds)  # fmt: skip
        return results

    async def _retry_stalled(self) -> None:
        """Put the jobs of dead workers back in the queue (procrastinate's heartbeats tell which)."""
        period = max(0.5, self.cfg.heartbeat_seconds)
        while True:
            await asyncio.sleep(period)
            try:
                await retry_stalled_jobs(self.app, self.cfg)
            except (ProcrastinateException, OSError) as exc:
                log.warning("checking for stalled jobs failed (%s); trying again", type(exc).__name__)

    async def run_async(self) -> None:
        loop = asyncio.get_running_loop()
        async with self.app.open_async():
            work = asyncio.create_task(self.app.run_worker_async(
                queues=[self.cfg.queue], name=self.name or "connector-worker", concurrency=1, wait=True,
                install_signal_handlers=False, update_heartbeat_interval=self.cfg.heartbeat_seconds,
                stalled_worker_timeout=self.cfg.stalled_after_seconds, delete_jobs="never",
                fetch_job_polling_interval=poll_seconds(self.settings),
            ))  # fmt: skip

            def stopping() -> None:
                log.info("stopping: the batch in flight is finished and committed, the job goes back to the queue")
                self.stop.set()  # the engine ends the sync after the batch in flight
                work.cancel()  # procrastinate stops taking jobs and waits for the running one

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopping)
            stalled = asyncio.create_task(self._retry_stalled())
            try:
                await work
            except asyncio.CancelledError:
                pass
            finally:
                stalled.cancel()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def run(self) -> None:
        _quiet_procrastinate()
        ensure_schema(self.cfg)
        if self.settings.ledger_sqlalchemy_url().startswith("sqlite"):
            log.warning("the ledger is SQLite: workers on other machines cannot share it (set ledger_url)")
        if self.settings.ledger_files is None or "://" not in self.settings.ledger_files:
            log.warning("ledger_files is a local folder: workers on other machines need shared storage (s3://...)")
        # host:pid is how `connector status` names the worker syncing a segment
        log.info("worker %s (%s:%d): queue %r, %d scheduled segment(s)", self.name or "", socket.gethostname(),
                 os.getpid(), self.cfg.queue, sum(1 for s in self.settings.segments.values() if s.schedule))  # fmt: skip
        try:
            asyncio.run(self.run_async())
        finally:
            self.engine.close()
            self.journal.close()
        log.info("stopped")


async def retry_stalled_jobs(app: App, cfg: WorkersConfig) -> int:
    """Jobs whose worker stopped sending heartbeats go back to the queue after a backoff; a job that has
    used its tries, or whose segment has a sync queued already (that one covers it), is failed instead.
    Every live worker runs this: a job another worker handled first is skipped."""
    n = 0
    for job in await app.job_manager.get_stalled_jobs(queue=cfg.queue, seconds_since_heartbeat=cfg.stalled_after_seconds):
        assert job.id is not None
        try:
            if job.attempts + 1 >= cfg.max_attempts:
                log.error("job %s (%s) failed: its worker died on the last of %d tries", job.id, job.call_string,
                          cfg.max_attempts)  # fmt: skip
                await app.job_manager.finish_job_by_id_async(job.id, Status.FAILED, delete_job=False)
                continue
            try:
                await app.job_manager.retry_job_by_id_async(
                    job.id, retry_at=now() + timedelta(seconds=cfg.backoff_seconds * 2**job.attempts)
                )
            except UniqueViolation:
                # a sync of the segment is queued already (the queueing lock) and will do the work
                log.info("job %s: its worker stopped; the sync queued for its segment covers it", job.id)
                await app.job_manager.finish_job_by_id_async(job.id, Status.FAILED, delete_job=False)
                continue
        except ProcrastinateException as exc:
            log.debug("job %s: handled by another worker (%s)", job.id, exc)
            continue
        log.warning("job %s (%s): its worker stopped; queued again (attempt %d)", job.id, job.call_string,
                    job.attempts + 2)  # fmt: skip
        n += 1
    return n


def run_worker(settings: ConnectorSettings, name: str | None = None) -> None:
    Worker(settings, name=name).run()


__all__ = [
    "SCHEDULED_TASK", "SYNC_TASK", "JobQueue", "QueuedJob", "Worker", "build_app", "read_queue", "run_worker", "segment_lock",
]  # fmt: skip
