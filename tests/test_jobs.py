"""Syncs as jobs on PostgreSQL (procrastinate): settings, the queue's coalescing, and the whole deployment
on loopback - `connector serve` + several `connector worker` processes, the member files on an
S3-compatible server (moto), the platforms' emulators - with a worker SIGKILLed mid-sync."""

from __future__ import annotations

import csv
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from s3_server import S3Server, s3_server

from connector.identifiers.normalize import Normalizer
from connector.ledger.journal import Journal
from connector.settings import ConnectorSettings, WorkersConfig

PG = os.environ.get("CONNECTOR_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(not PG, reason="CONNECTOR_TEST_POSTGRES_URL not set: job queue tests need PostgreSQL")
TOKEN = "jobs-meta-token-7c1d"
BEARER = "jobs-webhook-token-93ab"
IDS = ["email", "phone", "first_name", "last_name", "zip", "country"]
FIELDS = ["customer_id", *IDS]


# ---------------------------------------------------------------------- settings


def test_workers_url_must_be_postgresql_and_is_never_echoed() -> None:
    with pytest.raises(ValidationError) as err:
        WorkersConfig(url="mysql://root:hunter2@db/x")  # type: ignore[arg-type]
    text = str(err.value).split("input_value")[0]
    assert "expected a postgresql:// URL" in text and "hunter2" not in text
    ok = WorkersConfig(url="postgresql+psycopg://u:pw@h/db")  # type: ignore[arg-type]
    assert "pw" not in repr(ok)


def test_stalled_timeout_must_outlast_heartbeats() -> None:
    with pytest.raises(ValidationError, match="more than twice heartbeat_seconds"):
        WorkersConfig(url="postgresql://h/db", heartbeat_seconds=10, stalled_after_seconds=15)  # type: ignore[arg-type]


def test_worker_without_workers_table_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "connector.toml").write_text('state_dir = "s"\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "connector", "worker", "--config", str(tmp_path / "connector.toml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs a [workers] table" in proc.stderr


# ---------------------------------------------------------------------- PostgreSQL


def _plain(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme.split('+')[0]}://{rest}"


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A database of its own (procrastinate's tables live in it), dropped afterwards; its SQLAlchemy URL."""
    assert PG is not None
    import psycopg

    name = f"connector_jobs_{uuid.uuid4().hex[:10]}"
    admin = _plain(PG)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _settings(tmp: Path, db: str, segments: dict[str, str], **extra: Any) -> ConnectorSettings:
    seg = {name: {"source": {"type": "csv", "path": str(tmp / f"{name}.csv")}, "key": "customer_id",
                  "identifiers": {"email": "email"}, "destinations": ["meta", "meta2"],
                  **({"schedule": sched} if sched else {})} for name, sched in segments.items()}  # fmt: skip
    return ConnectorSettings(
        state_dir=tmp / "state", ledger_url=db, workers={"url": db, "backoff_seconds": 1},  # type: ignore[arg-type]
        destinations={"meta": {"type": "meta", "ad_account_id": "1", "sandbox": True},
                      "meta2": {"type": "meta", "ad_account_id": "2", "sandbox": True}},  # type: ignore[arg-type]
        segments=seg, **extra,  # type: ignore[arg-type]
    )


@needs_pg
def test_triggers_while_queued_coalesce_and_a_wider_one_widens_the_job(tmp_path: Path, pg_database: str) -> None:
    from connector.jobs import JobQueue, segment_lock

    settings = _settings(tmp_path, pg_database, {"a": "", "b": ""})
    journal = Journal(settings.ledger_sqlalchemy_url())
    queue = JobQueue(settings, journal)
    queue.open()
    try:
        new, ids = queue.enqueue("a", ["meta"], "webhook")
        assert new and set(ids) == {"meta"}
        again, same = queue.enqueue("a", ["meta"], "webhook")
        assert not again and same == ids  # joined the queued job: same runs
        wider, ids2 = queue.enqueue("a", None, "webhook")
        assert not wider and ids2["meta"] == ids["meta"] and set(ids2) == {"meta", "meta2"}
        jobs = queue.app.job_manager.list_jobs(queueing_lock=segment_lock("a"), status="todo")
        assert len(jobs) == 1 and jobs[0].task_kwargs["destinations"] is None
        assert jobs[0].lock == segment_lock("a")
        queue.enqueue("b", None, "webhook")
        assert queue.pending() == ["a", "b"]
        statuses = {r.id: r.status for r in journal.list_runs(10)}
        assert statuses[ids2["meta"]] == "queued" and statuses[ids2["meta2"]] == "queued"
    finally:
        queue.close()
        journal.close()


@needs_pg
def test_a_schedule_is_a_periodic_task_with_the_segment_locks(tmp_path: Path, pg_database: str) -> None:
    from connector.jobs import SCHEDULED_TASK, build_app, segment_lock

    app = build_app(_settings(tmp_path, pg_database, {"nightly": "0 3 * * *", "manual": ""}))
    periodic = {pid: pt for (name, pid), pt in app.periodic_registry.periodic_tasks.items() if name == SCHEDULED_TASK}
    assert set(periodic) == {"nightly"}
    assert periodic["nightly"].cron == "0 3 * * *"
    assert periodic["nightly"].configure_kwargs["lock"] == segment_lock("nightly")
    assert periodic["nightly"].configure_kwargs["queueing_lock"] == segment_lock("nightly")


# ---------------------------------------------------------------------- status and runs show the queue


def _queue_config(tmp: Path, queue_url: str, segments: tuple[str, ...] = ("a", "b", "c")) -> Path:
    lines = ['state_dir = "state"', "webhook_debounce_seconds = 0", "[workers]", f'url = "{queue_url}"',
             "[destinations.meta]", 'type = "meta"', 'ad_account_id = "1"', "sandbox = true",
             "[destinations.meta2]", 'type = "meta"', 'ad_account_id = "2"', "sandbox = true"]  # fmt: skip
    for name in segments:
        lines += [f"[segments.{name}]", f'source = {{ type = "csv", path = "{name}.csv" }}', 'key = "customer_id"',
                  'identifiers = { email = "email" }', 'destinations = ["meta", "meta2"]']  # fmt: skip
    cfg = tmp / "connector.toml"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cfg


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from connector.cli import app

    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout + res.stderr


@needs_pg
def test_status_and_runs_show_queued_running_and_retrying_jobs(tmp_path: Path, pg_database: str) -> None:
    import asyncio
    import json
    from datetime import UTC, datetime, timedelta

    from connector.jobs import JobQueue, build_app
    from connector.locks import Coordinator
    from connector.settings import load_settings

    cfg = _queue_config(tmp_path, pg_database)
    settings = load_settings(cfg)
    journal = Journal(settings.ledger_sqlalchemy_url())
    queue = JobQueue(settings, journal)
    queue.open()
    before = datetime.now(UTC)
    try:
        for segment, dests in (("a", None), ("b", None), ("c", ["meta2"])):
            assert queue.enqueue(segment, dests, "webhook")[0]
    finally:
        queue.close()

    async def a_worker_takes_two_and_one_fails() -> tuple[int, str, str]:
        # what a worker does through procrastinate's manager: register, take the due jobs, retry a failed one
        app = build_app(settings)
        async with app.open_async():
            manager = app.job_manager
            wid = await manager.register_worker()
            running = await manager.fetch_job(queues=["connector"], worker_id=wid)
            failed = await manager.fetch_job(queues=["connector"], worker_id=wid)
            assert running is not None and failed is not None and failed.id is not None
            await manager.retry_job_by_id_async(failed.id, retry_at=datetime.now(UTC) + timedelta(hours=1))
            return wid, str(running.task_kwargs["segment"]), str(failed.task_kwargs["segment"])

    worker_id, running, retrying = asyncio.run(a_worker_takes_two_and_one_fails())
    assert {running, retrying} == {"a", "b"}
    # the process syncing the running job holds its pairs' leases in the journal
    assert Coordinator(journal, holder="box-7:4242:1a2b3c4d:-").try_acquire(running, "meta") is None
    journal.close()

    code, out = _cli("status", "--config", str(cfg), "--json")
    assert code == 0, out
    jobs = {j["segment"]: j for j in json.loads(out)["jobs"]}
    assert set(jobs) == {"a", "b", "c"}
    run, retry, queued = jobs[running], jobs[retrying], jobs["c"]
    assert (run["state"], run["attempt"], run["worker_id"], run["worker"]) == ("running", 1, worker_id, "box-7:4242")
    assert run["started_at"] is not None and run["due_at"] is None
    assert (retry["state"], retry["attempt"], retry["max_attempts"], retry["worker"]) == ("retrying", 2, 5, None)
    assert datetime.fromisoformat(retry["due_at"]) > before + timedelta(minutes=59)
    assert (queued["state"], queued["attempt"], queued["destinations"], queued["trigger"]) == ("queued", 1, ["meta2"], "webhook")
    for j in jobs.values():
        assert before - timedelta(seconds=5) <= datetime.fromisoformat(j["queued_at"]) <= datetime.now(UTC)
    assert jobs["a"]["destinations"] is None

    code, out = _cli("runs", "--config", str(cfg), "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert [j["segment"] for j in doc["jobs"]] == ["a", "b", "c"]
    assert sorted(r["status"] for r in doc["runs"]) == ["queued"] * 5  # the runs the webhooks queued

    for command in ("status", "runs"):
        code, out = _cli(command, "--config", str(cfg))
        assert code == 0, out
        assert "job queue" in out and "box-7:4242" in out and "retrying" in out and "2/5" in out, out
        assert "meta2" in out and "all" in out


@needs_pg
def test_status_reads_a_queue_no_process_has_created_yet_without_creating_it(tmp_path: Path, pg_database: str) -> None:
    import json

    import psycopg

    cfg = _queue_config(tmp_path, pg_database, ("a",))
    code, out = _cli("status", "--config", str(cfg), "--json")
    assert code == 0, out
    assert json.loads(out)["jobs"] == []
    code, out = _cli("runs", "--config", str(cfg))
    assert code == 0 and "job queue: empty" in out, out
    with psycopg.connect(_plain(pg_database)) as conn:
        row = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
    assert row is not None and row[0] is None


def test_an_unreachable_queue_is_an_error_without_its_url(tmp_path: Path) -> None:
    import json

    cfg = _queue_config(tmp_path, "postgresql://bob:pw-in-url-5150@127.0.0.1:9/queue")  # nothing listens on port 9
    code, out = _cli("status", "--config", str(cfg), "--json")
    assert code == 1, out
    doc = json.loads(out)
    assert "could not read the job queue" in doc["error"]
    assert "pw-in-url-5150" not in out and "bob" not in out


# ---------------------------------------------------------------------- the deployment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _person(i: int, gen: int) -> dict[str, str]:
    return {"customer_id": f"C{i}", "email": f"user{i}.g{gen}@example.com", "phone": f"+1415555{i % 10000:04d}",
            "first_name": "Mary", "last_name": "Smith", "zip": "94107", "country": "US"}  # fmt: skip


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _expected(platform: str, rows: list[dict[str, str]]) -> set[frozenset[tuple[str, str]]]:
    n = Normalizer(platform, IDS, "US")  # type: ignore[arg-type]
    return {frozenset(n.normalize({k: r[k] for k in IDS}).payload.items()) for r in rows}


class Deployment:
    """serve + workers as real processes, sharing PostgreSQL (ledger and queue) and the S3 server."""

    def __init__(self, tmp: Path, cfg: Path, env: dict[str, str]) -> None:
        self.tmp, self.cfg, self.env = tmp, cfg, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()  # stopped on purpose: their exit is no failure

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        err = (self.tmp / f"{name}.err").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "connector", *args, "--config", str(self.cfg)],
                                stdout=subprocess.DEVNULL, stderr=err, env=self.env, cwd=self.tmp)  # fmt: skip
        self.procs[name] = proc
        return proc

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        return self.start(name, "worker", "--name", name)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.err").read_text(errors="replace")

    def stop_all(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes


def _wait(what: str, done: Any, procs: Deployment, timeout: float = 90) -> None:
    """Poll a state the processes report (journal, job table) until `done()`; fail with the logs if never."""
    deadline = time.monotonic() + timeout
    while not done():
        died = [n for n, p in procs.procs.items() if n not in procs.killed and p.poll() is not None]
        if died or time.monotonic() > deadline:
            what = f"{what} ({', '.join(died)} exited)" if died else what
            logs = "\n".join(f"--- {n}\n{procs.log(n)[-3000:]}" for n in procs.procs)
            raise AssertionError(f"gave up waiting for {what}\n{logs}")
        time.sleep(0.2)


def _overlaps(journal: Journal) -> list[str]:
    """Pairs with two runs whose [started, ended] intervals overlap (runs that ran, not queued/coalesced)."""
    by_pair: dict[tuple[str, str], list[Any]] = {}
    for r in journal.list_runs(5000):
        if r.status in ("queued", "coalesced"):
            continue
        by_pair.setdefault((r.segment, r.destination), []).append(r)
    bad = []
    for pair, rs in by_pair.items():
        rs.sort(key=lambda r: r.started_at)
        for a, b in itertools.pairwise(rs):
            if a.ended_at is None or b.started_at < a.ended_at:
                bad.append(f"{pair}: run {a.id} ({a.started_at}-{a.ended_at}) and run {b.id} ({b.started_at})")
    return bad


def _synced_since(journal: Journal, pairs: list[tuple[str, str]], since: float) -> bool:
    ok = {(r.segment, r.destination) for r in journal.list_runs(5000)
          if r.status == "success" and r.started_at.timestamp() >= since}  # fmt: skip
    return all(p in ok for p in pairs)


@needs_pg
@pytest.mark.slow
def test_workers_converge_with_a_worker_killed_mid_sync_and_one_added(tmp_path: Path, pg_database: str) -> None:
    from connector.sandbox.faults import FaultKnobs
    from connector.sandbox.google_datamanager import DataManagerEmulator
    from connector.sandbox.meta_graph import MetaGraphEmulator
    from connector.sandbox.tls import ROOTS_ENV, localhost_certificate

    localhost_certificate()  # the Data Manager emulator's certificate: the workers' trusted root
    names = [f"s{i:02d}" for i in range(20)]
    scheduled = set(names[:6])  # every 4 seconds; the rest only by webhooks
    rows = {n: [_person(i, 0) for i in range(40 + 7 * k)] for k, n in enumerate(names)}
    for n in names:
        _write(tmp_path / f"{n}.csv", rows[n])
    # latency: a sync takes long enough (several Graph calls) for the kill to land inside one
    meta = MetaGraphEmulator(expected_token=TOKEN, faults=FaultKnobs(latency_seconds=0.15, fail_writes_only=False))
    dm = DataManagerEmulator()
    with meta, dm, s3_server() as s3:
        s3.create_bucket("ledger")
        cfg = _deployment_config(tmp_path, pg_database, s3, meta.url, dm.url, names, scheduled)
        env = {**os.environ, **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
               "CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN": TOKEN, "CONNECTOR_WEBHOOK_BEARER_TOKEN": BEARER,
               ROOTS_ENV: os.environ[ROOTS_ENV], "PYTHONUNBUFFERED": "1"}  # fmt: skip
        dep = Deployment(tmp_path, cfg, env)
        journal = Journal(_plain(pg_database).replace("postgresql://", "postgresql+psycopg://", 1))
        port = _free_port()
        try:
            dep.start("serve", "serve", "--port", str(port))
            for w in ("w1", "w2", "w3"):
                dep.worker(w)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                  headers={"Authorization": f"Bearer {BEARER}"})  # fmt: skip
            _wait("serve to listen", lambda: _healthy(client), dep)
            pairs = [(n, d) for n in names for d in ("meta", "google")]
            t0 = time.time()
            for n in names:
                if n not in scheduled:
                    r = client.post(f"/webhooks/segments/{n}", json={})
                    assert r.status_code == 202 and r.json()["status"] in ("queued", "coalesced"), r.text

            # a worker is killed while it holds a pair (mid-sync): its lease names its pid
            victim = _wait_for_busy_worker(journal, dep)
            dep.killed.add(victim)
            dep.procs[victim].send_signal(signal.SIGKILL)
            dep.procs[victim].wait()
            dep.worker("w4")  # and another one joins
            _wait("every pair synced once", lambda: _synced_since(journal, pairs, t0), dep, timeout=120)

            # the segments change; webhooks and schedules bring the audiences along
            for k, n in enumerate(names):
                rows[n] = rows[n][3:] + [_person(i, 1) for i in range(1000, 1000 + k % 5 + 1)]
                rows[n][0] = {**rows[n][0], "email": f"changed.{n}@example.com"}
                _write(tmp_path / f"{n}.csv", rows[n])
            t1 = time.time()
            for n in names:
                if n not in scheduled:
                    assert client.post(f"/webhooks/segments/{n}", json={}).status_code == 202
            _wait("every pair synced after the change", lambda: _synced_since(journal, pairs, t1), dep, timeout=120)
        finally:
            codes = dep.stop_all()

        assert dep.procs[victim].returncode == -signal.SIGKILL
        assert {n: c for n, c in codes.items() if n != victim} == {n: 0 for n in dep.procs if n != victim}, codes
        # every audience is exactly its segment
        for n in names:
            for dest, platform in (("meta", "meta"), ("google", "google")):
                rec = journal.get_audience(n, dest)
                assert rec is not None, (n, dest)
                have = meta.member_dicts(rec.audience_id) if platform == "meta" else {
                    frozenset((k, v) for k, v in row if v) for row in dm.members(rec.audience_id)}
                assert have == _expected(platform, rows[n]), f"{n} -> {dest}: {len(have)} on the platform"
        # never two workers on one pair at once, and nothing left running
        assert _overlaps(journal) == []
        assert not [r for r in journal.list_runs(5000) if r.status in ("running", "queued")]
        # the dead worker's job went back to the queue through procrastinate's heartbeats
        assert any("its worker stopped; queued again" in dep.log(w) or "the sync queued for its segment covers it" in dep.log(w)
                   for w in ("w2", "w3", "w4", "w1") if w != victim), [dep.log(w)[-2000:] for w in dep.procs]
        # each schedule fired once per period, however many workers ran its deferrer (jobs are kept)
        import psycopg

        with psycopg.connect(_plain(pg_database)) as conn:
            fired = conn.execute("SELECT args->>'segment', (args->>'timestamp')::bigint FROM procrastinate_jobs "
                                 "WHERE task_name = 'connector.scheduled_sync'").fetchall()  # fmt: skip
        ticks: dict[str, list[int]] = {}
        for seg_name, ts in fired:
            ticks.setdefault(seg_name, []).append(int(ts))
        assert set(ticks) == scheduled
        elapsed = time.time() - t0
        for seg_name, stamps in ticks.items():
            assert len(stamps) == len(set(stamps)), (seg_name, sorted(stamps))  # no tick deferred twice
            assert all(t % 4 == 0 for t in stamps) and 2 <= len(stamps) <= elapsed / 4 + 2, (seg_name, stamps, elapsed)
        # member files live on S3 only: each pair's pointer names objects that exist
        objects = set(s3.objects("ledger", "members"))
        for n in names:
            for dest in ("meta", "google"):
                ptr = journal.pointer(n, dest)
                for name in (ptr.base, ptr.delta):
                    if name:
                        assert any(o.endswith("/" + name) for o in objects), (n, dest, name)
        journal.close()


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for_busy_worker(journal: Journal, dep: Deployment) -> str:
    from connector.locks import Coordinator

    coord = Coordinator(journal)
    pids = {p.pid: name for name, p in dep.procs.items() if name.startswith("w")}
    found: list[str] = []

    def busy() -> bool:
        for holder, _ in coord.holders().values():
            pid = int(holder.split(":")[1])
            if pid in pids:
                found.append(pids[pid])
                return True
        return False

    _wait("a worker mid-sync", busy, dep)
    return found[0]


def _deployment_config(tmp: Path, db: str, s3: S3Server, meta_url: str, dm_url: str, names: list[str],
                       scheduled: set[str]) -> Path:  # fmt: skip
    retry = "max_attempts = 8\nbackoff_max_seconds = 0.2\ntimeout_seconds = 10"
    lines = [
        'state_dir = "state"', f'ledger_url = "{db}"', f'ledger_files = "{s3.url("ledger", "members")}"',
        "max_remove_share = 0.9",
        "[workers]", f'url = "{db}"', "heartbeat_seconds = 0.5", "stalled_after_seconds = 3", "backoff_seconds = 0.5",
        "[destinations.meta]", 'type = "meta"', 'ad_account_id = "act_77"', f'graph_url = "{meta_url}"', retry,
        "[destinations.google]", 'type = "google"', 'customer_id = "1234567890"', "sandbox = true",
        f'datamanager_endpoint = "{dm_url}"', 'customer_match_terms = "accepted"', retry,
    ]  # fmt: skip
    ids = ", ".join(f'{k} = "{k}"' for k in IDS)
    for n in names:
        lines += [f"[segments.{n}]", f'source = {{ type = "csv", path = "{n}.csv" }}', 'key = "customer_id"',
                  f"identifiers = {{ {ids} }}", 'destinations = ["meta", "google"]']  # fmt: skip
        if n in scheduled:
            lines.append('schedule = "* * * * * */4"')
    cfg = tmp / "connector.toml"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cfg


@needs_pg
def test_old_finished_jobs_are_removed_by_the_cleanup_task(tmp_path: Path, pg_database: str) -> None:
    import psycopg

    from connector.jobs import build_app, ensure_schema

    settings = _settings(tmp_path, pg_database, {"a": ""})
    assert settings.workers is not None
    ensure_schema(settings.workers)
    app = build_app(settings)
    with app.open():
        old = app.configure_task("connector.sync_segment", queue="connector").defer(segment="a")
        app.configure_task("connector.remove_old_jobs", queue="connector").defer(timestamp=0)
    with psycopg.connect(_plain(pg_database), autocommit=True) as conn:
        # a sync that finished long ago (no worker ran it here)
        conn.execute("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE id = %s", (old,))
        conn.execute("UPDATE procrastinate_events SET at = now() - interval '100 hours' WHERE job_id = %s", (old,))
        conn.execute("INSERT INTO procrastinate_events (job_id, type, at) VALUES (%s, 'succeeded', now() - interval '99 hours')", (old,))
    app.run_worker(queues=["connector"], wait=False, install_signal_handlers=False)
    with psycopg.connect(_plain(pg_database)) as conn:
        left = conn.execute("SELECT task_name, status FROM procrastinate_jobs").fetchall()
    # the old sync is gone; the cleanup itself (and any hourly tick the worker deferred) succeeded
    assert left and set(left) == {("connector.remove_old_jobs", "succeeded")}


@needs_pg
@pytest.mark.slow
def test_sigterm_mid_sync_commits_the_batch_in_flight_and_requeues_the_rest(tmp_path: Path, pg_database: str) -> None:
    from connector.jobs import JobQueue
    from connector.sandbox.faults import FaultKnobs
    from connector.sandbox.meta_graph import MetaGraphEmulator

    rows = [_person(i, 0) for i in range(25_000)]  # three Meta batches (10,000 a call)
    _write(tmp_path / "big.csv", rows)
    meta = MetaGraphEmulator(expected_token=TOKEN, faults=FaultKnobs(latency_seconds=0.5, fail_writes_only=False))
    with meta:
        ids = ", ".join(f'{k} = "{k}"' for k in IDS)
        cfg = tmp_path / "connector.toml"
        cfg.write_text("\n".join([
            'state_dir = "state"', f'ledger_url = "{pg_database}"',
            "[workers]", f'url = "{pg_database}"', "heartbeat_seconds = 0.5", "stalled_after_seconds = 3",
            "backoff_seconds = 0.5",
            "[destinations.meta]", 'type = "meta"', 'ad_account_id = "act_77"', f'graph_url = "{meta.url}"',
            "[segments.big]", 'source = { type = "csv", path = "big.csv" }', 'key = "customer_id"',
            f"identifiers = {{ {ids} }}", 'destinations = ["meta"]',
        ]) + "\n", encoding="utf-8")  # fmt: skip
        from connector.settings import load_settings

        settings = load_settings(cfg)
        journal = Journal(settings.ledger_sqlalchemy_url())
        queue = JobQueue(settings, journal)
        queue.open()
        env = {**os.environ, "CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        dep = Deployment(tmp_path, cfg, env)
        try:
            _, run_ids = queue.enqueue("big", None, "webhook")
            first = dep.worker("first")
            # the first batch is acknowledged (one journal row): the second is on its way or next, the third waits
            _wait("a batch acknowledged", lambda: journal.acks("big", "meta").num_rows >= 1, dep)
            dep.killed.add("first")
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=60) == 0, dep.log("first")
            runs_ = {r.id: r for r in journal.list_runs(10)}
            assert runs_[run_ids["meta"]].status == "interrupted", dep.log("first")
            jobs = queue.app.job_manager.list_jobs(task="connector.sync_segment")
            assert [(j.status, j.attempts) for j in jobs] == [("todo", 1)]  # back in the queue, not lost
            sent = len(meta.member_dicts(journal.get_audience("big", "meta").audience_id))  # type: ignore[union-attr]
            assert sent in (10_000, 20_000), sent  # whole batches only: the one in flight was finished

            dep.worker("second")
            _wait("the rest synced", lambda: any(r.status == "success" for r in journal.list_runs(10)), dep)
            # the interrupted run keeps its record; the retry recorded a run of its own
            statuses = sorted((r.id, r.status) for r in journal.list_runs(10))
            assert statuses == [(run_ids["meta"], "interrupted"), (statuses[1][0], "success")], statuses
        finally:
            dep.stop_all()
            queue.close()
        rec = journal.get_audience("big", "meta")
        assert rec is not None and meta.member_dicts(rec.audience_id) == _expected("meta", rows)
        journal.close()
