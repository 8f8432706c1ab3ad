"""`connector serve`: the real server (uvicorn on a loopback port) driven with httpx."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from connector.clock import FakeClock
from connector.ledger.journal import Journal
from connector.locks import Coordinator
from connector.sandbox.google_datamanager import ApiError as DataManagerApiError
from connector.sandbox.google_datamanager import DataManagerEmulator
from connector.sandbox.meta_graph import MetaGraphEmulator
from connector.sandbox.server import HttpRequest, HttpResponse
from connector.server import SyncService, create_app, sign
from connector.settings import load_settings

SECRET = "whsec-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_members(path: Path, n: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "email"])
        w.writerows([f"C{i}", f"user{i}@example.com"] for i in range(n))


def write_config(tmp: Path, n: int = 50, schedule: str | None = None) -> Path:
    write_members(tmp / "m.csv", n)
    cfg = tmp / "connector.toml"
    cfg.write_text(f"""
state_dir = "state"
webhook_secret = "{SECRET}"
[destinations.meta]
type = "meta"
ad_account_id = "act_1"
sandbox = true
[segments.vip]
source = {{ type = "csv", path = "m.csv" }}
key = "id"
identifiers = {{ email = "email" }}
destinations = ["meta"]
{f'schedule = "{schedule}"' if schedule else ""}
""")
    return cfg


class Running:
    def __init__(self, cfg: Path) -> None:
        self.settings = load_settings(cfg)
        self.service = SyncService(self.settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.settings, self.service), host="127.0.0.1",
                                                    port=self.port, log_level="warning", lifespan="on"))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def post(self, body: bytes, *, ts: float | None = None, secret: str = SECRET, segment: str = "vip",
             headers: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
        stamp = str(int(ts if ts is not None else time.time()))
        h = {"X-Connector-Timestamp": stamp, "X-Connector-Signature": "sha256=" + sign(secret, stamp, body),
             "Content-Type": "application/json", **(headers or {})}  # fmt: skip
        return httpx.post(f"{self.url}/webhooks/segments/{segment}", content=body, headers=h, timeout=10)

    def runs(self) -> list[dict[str, object]]:
        return list(httpx.get(f"{self.url}/runs", timeout=10).json()["runs"])

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = httpx.get(f"{self.url}/healthz", timeout=10).json()
            if h["running"] is None and not h["queued"]:
                return
            time.sleep(0.05)
        raise AssertionError("server did not become idle")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(write_config(tmp_path))
    yield r
    r.stop()


def test_signed_webhook_runs_a_sync_into_the_emulator(running: Running) -> None:
    resp = running.post(json.dumps({"event_id": "evt-1"}).encode())
    assert resp.status_code == 202, resp.text
    queued = resp.json()
    assert queued["status"] == "queued" and queued["run_ids"] == {"meta": queued["run_id"]}
    running.wait_idle()
    (run,) = running.runs()
    assert run["id"] == queued["run_id"]
    assert run["trigger"] == "webhook" and run["status"] == "success"
    assert run["counts"]["adds"] == 50  # type: ignore[index]
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'connector_runs_total{status="success"} 1' in metrics
    assert 'connector_members_added_total{segment="vip",destination="meta"} 50' in metrics
    assert "connector_last_success_timestamp_seconds" in metrics
    assert httpx.get(f"{running.url}/openapi.json").json()["paths"]["/webhooks/segments/{name}"]


def test_rejected_requests_trigger_nothing(running: Running) -> None:
    body = json.dumps({"event_id": "evt-x"}).encode()
    assert running.post(body, secret="wrong-secret").status_code == 401
    assert running.post(body, ts=time.time() - 600).status_code == 401
    assert running.post(b"{not json").status_code == 400
    assert running.post(b"{}", segment="nope").status_code == 404
    assert running.post(b"x" * (65 * 1024)).status_code == 413
    assert httpx.post(f"{running.url}/webhooks/segments/vip", content=b"{}").status_code == 401  # unsigned
    assert running.post(json.dumps({"destinations": ["google"]}).encode()).status_code == 400
    # an accepted webhook queues its run before it answers: nothing was queued, nothing ran
    assert running.service.coord.pending() == [] and running.runs() == []
    assert running.post(body).status_code == 202
    assert running.post(body).status_code == 409  # same event_id: a replay
    running.wait_idle()
    assert len(running.runs()) == 1


class HoldingMeta(MetaGraphEmulator):
    """A Meta emulator that holds its `hold_at`-th add request (POST .../users) until `release` is set,
    after setting `arrived`: the test knows a batch is in flight and that the ones before it were
    answered."""

    def __init__(self, hold_at: int, **kw: Any) -> None:
        self.hold_at, self.adds = hold_at, 0
        self.arrived, self.release = threading.Event(), threading.Event()
        super().__init__(**kw)

    def handle(self, req: HttpRequest) -> HttpResponse:
        if req.method == "POST" and req.path.rstrip("/").endswith("/users"):
            with self._lock:
                self.adds += 1
                held = self.adds == self.hold_at
            if held:
                self.arrived.set()
                assert self.release.wait(120), "the test never released the held batch"
        return super().handle(req)


@pytest.fixture
def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Running, HoldingMeta]]:
    """A server whose Meta destination is an emulator that holds the first add request: a run is in
    progress, for certain, until the test sets `release`."""
    with HoldingMeta(hold_at=1) as emu:
        cfg = write_config(tmp_path)
        cfg.write_text(cfg.read_text().replace("sandbox = true", f'graph_url = "{emu.url}"'))
        monkeypatch.setenv("CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN", "sandbox-token")
        r = Running(cfg)
        try:
            yield r, emu
        finally:
            emu.release.set()
            r.stop()


def test_fifty_webhooks_during_a_run_make_one_more_run(held: tuple[Running, HoldingMeta]) -> None:
    """Triggers that arrive while a run is in progress coalesce into one queued run."""
    from concurrent.futures import ThreadPoolExecutor

    r, emu = held
    assert r.post(json.dumps({"event_id": "first"}).encode()).status_code == 202
    assert emu.arrived.wait(60), "the first run never sent its batch"
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda i: r.post(json.dumps({"event_id": f"e{i}"}).encode()).status_code, range(50)))
    assert codes == [202] * 50
    assert [x["status"] for x in r.runs()] == ["queued", "running"]  # the first is still in progress
    emu.release.set()
    r.wait_idle(60)
    runs = r.runs()
    assert [(x["trigger"], x["status"]) for x in runs] == [("webhook", "success")] * 2, runs
    assert [x["counts"]["adds"] for x in runs] == [0, 50], runs  # type: ignore[index]


def test_schedule_during_a_webhook_run_does_not_overlap(held: tuple[Running, HoldingMeta]) -> None:
    r, emu = held
    assert r.post(b"{}").status_code == 202
    assert emu.arrived.wait(60), "the webhook's run never sent its batch"
    r.service.trigger("vip", None, "schedule")  # what the scheduler does when the cron fires
    r.service.trigger("vip", None, "schedule")
    emu.release.set()
    r.wait_idle(60)
    runs = sorted(r.runs(), key=lambda x: str(x["started_at"]))
    assert [(x["trigger"], x["status"]) for x in runs] == [("webhook", "success"), ("schedule", "success")], runs
    assert str(runs[0]["ended_at"]) <= str(runs[1]["started_at"])


class QuotaDataManager(DataManagerEmulator):
    """A Data Manager emulator whose daily quota is used up until `quota_left` is set: every ingest is
    refused with RESOURCE_EXHAUSTED, as the API answers then."""

    def __init__(self, **kw: Any) -> None:
        self.quota_left = False
        self.refused = 0
        super().__init__(**kw)

    def handle(self, req: HttpRequest) -> HttpResponse:
        if req.method == "POST" and req.path.endswith(":ingest") and not self.quota_left:
            self.refused += 1
            return DataManagerApiError("RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Requests per day'").response()
        return super().handle(req)


def test_quota_exhausted_stops_the_pair_without_retrying_and_the_next_trigger_resumes(tmp_path: Path) -> None:
    with QuotaDataManager() as emu:
        cfg = write_config(tmp_path)
        cfg.write_text(cfg.read_text().replace('destinations = ["meta"]', 'destinations = ["google"]') + f"""
[destinations.google]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
sandbox = true
datamanager_endpoint = "{emu.url}"
max_attempts = 8
backoff_max_seconds = 0.01
""")
        r = Running(cfg)
        try:
            assert r.post(json.dumps({"event_id": "q1"}).encode()).status_code == 202
            r.wait_idle()
            (run,) = r.runs()
            assert run["status"] == "failed" and "quota exhausted, will retry on the next run" in str(run["error"]), run
            # stopped at once: one ingest, not max_attempts of them, and nothing queued to spin on
            assert emu.refused == 1 and r.service.coord.pending() == []
            assert r.service.engine.stats["google"].retries == 0
            emu.quota_left = True  # the quota refills; the next trigger (a schedule in production) resumes
            assert r.post(json.dumps({"event_id": "q2"}).encode()).status_code == 202
            r.wait_idle()
            runs = r.runs()
            assert [x["status"] for x in runs] == ["success", "failed"], runs
            assert runs[0]["counts"]["adds"] == 50 and emu.refused == 1  # type: ignore[index]
            (members,) = (emu.members(lid) for lid in emu.lists)
            assert len(members) == 50
        finally:
            r.stop()


HOLD = """
import sys, time, json
from connector.ledger.journal import Journal
from connector.locks import Coordinator
ledger = Journal(sys.argv[1])
lock = Coordinator(ledger, lease_seconds=5).pair_lock(wait=True)
spans = []
for _ in range(3):
    with lock("vip", "meta"):
        start = time.time(); time.sleep(0.2); spans.append((start, time.time()))
print(json.dumps(spans))
"""


def test_two_processes_never_hold_the_same_pair(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Journal(url).close()
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    spans = sorted(s for p in procs for s in json.loads(p.communicate(timeout=60)[0]))
    assert len(spans) == 6
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "two processes held the lock at once"


def test_manual_sync_no_wait_exits_1_naming_the_holder(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    settings = load_settings(cfg)
    ledger = Journal(settings.ledger_sqlalchemy_url())
    coord = Coordinator(ledger, holder="other-host:4242:abcd")
    assert coord.try_acquire("vip", "meta") is None
    from typer.testing import CliRunner

    from connector.cli import app

    res = CliRunner().invoke(app, ["sync", "--config", str(cfg), "--no-wait"])
    assert res.exit_code == 1 and "other-host:4242:abcd" in res.stderr
    coord.release("vip", "meta")
    res = CliRunner().invoke(app, ["sync", "--config", str(cfg), "--no-wait", "--json"])
    assert res.exit_code == 0, res.stderr
    ledger.close()


def test_expired_lease_of_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    """The leases run on a clock the test moves: no sleep, no race with the lease."""
    clock = FakeClock()
    ledger = Journal(f"sqlite:///{tmp_path / 'l.db'}")
    # another machine's holder: no pid to check, only its lease decides
    dead = Coordinator(ledger, lease_seconds=60, holder="other-host:1:dead", clock=clock)
    alive = Coordinator(ledger, lease_seconds=60, holder="alive", clock=clock)
    assert dead.try_acquire("s", "d") is None
    clock.advance(59)
    assert alive.try_acquire("s", "d") == "other-host:1:dead"  # the lease still runs
    clock.advance(2)
    assert alive.try_acquire("s", "d") is None  # expired: taken over
    assert dead.try_acquire("s", "d") == "alive"
    ledger.close()


def start_serve(cmd: list[str], env: dict[str, str], port: int, err: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env=env, stderr=err.open("ab"))
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except httpx.TransportError:
            assert time.time() < deadline and proc.poll() is None, f"server did not start: {err.read_text()[-2000:]}"
            time.sleep(0.1)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.time() < deadline and proc.poll() is None, f"no {text!r} in: {path.read_text()[-2000:]}"
        time.sleep(0.01)


def test_sigterm_mid_sync_interrupts_the_run_exits_0_and_the_next_start_completes(tmp_path: Path) -> None:
    """SIGTERM while the second of three 10,000-member batches is in flight: that batch is finished and
    committed, the third is not sent, the run ends `interrupted` with the rest queued again, and `serve`
    exits 0. The next start sends the third batch and nothing else."""
    cfg = write_config(tmp_path, n=30_000)
    with HoldingMeta(hold_at=2) as emu:
        cfg.write_text(cfg.read_text().replace("sandbox = true", f'graph_url = "{emu.url}"'))
        port = free_port()
        env = {**os.environ, "CONNECTOR_CONFIG": str(cfg), "CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN": "sandbox-token",
               "CONNECTOR_WEBHOOK_DEBOUNCE_SECONDS": "0"}  # fmt: skip
        cmd = [sys.executable, "-m", "connector.cli", "serve", "--port", str(port)]
        err = tmp_path / "serve.err"
        proc = start_serve(cmd, env, port, err)
        try:
            stamp = str(int(time.time()))
            resp = httpx.post(f"http://127.0.0.1:{port}/webhooks/segments/vip", content=b"{}", headers={
                "X-Connector-Timestamp": stamp, "X-Connector-Signature": sign(SECRET, stamp, b"{}")})  # fmt: skip
            assert resp.status_code == 202, resp.text
            assert emu.arrived.wait(120), "the second batch never reached the platform"
            proc.send_signal(signal.SIGTERM)
            # the service logs this line just before it sets its stop flag; the held batch is answered
            # after it, so the engine sees the flag once that batch is committed
            wait_for_text(err, "shutting down", proc)
            emu.release.set()
            assert proc.wait(timeout=60) == 0, err.read_text()[-2000:]  # a graceful shutdown is a success
        finally:
            emu.release.set()
            if proc.poll() is None:
                proc.kill()
        (aid,) = emu.audiences
        assert len(emu.members(aid)) == 20_000  # the first two batches; the third was never sent
        ledger = Journal(f"sqlite:///{tmp_path / 'state' / 'ledger.db'}")
        try:
            runs = ledger.list_runs()
            assert [r.status for r in runs] == ["queued", "interrupted"], [(r.status, r.error) for r in runs]
            assert "shutdown requested" in (runs[1].error or "")
            proc = start_serve(cmd, env, port, err)  # resumes the queued run
            try:
                deadline = time.time() + 120
                while (runs := ledger.list_runs())[0].status in ("queued", "running"):
                    assert time.time() < deadline, [(r.status, r.error) for r in runs]
                    time.sleep(0.1)
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0, err.read_text()[-2000:]
            assert [r.status for r in runs] == ["success", "interrupted"], [(r.status, r.error) for r in runs]
            assert runs[0].counts["adds"] == 10_000, runs[0].counts
        finally:
            ledger.close()
        assert len(emu.members(aid)) == 30_000 and emu.adds == 3


def test_cron_schedule_runs_inside_serve(tmp_path: Path) -> None:
    r = Running(write_config(tmp_path, schedule="* * * * * *"))  # every second (croniter's seconds field)
    try:
        deadline = time.time() + 20
        while not any(x["trigger"] == "schedule" and x["status"] == "success" for x in r.runs()):
            assert time.time() < deadline, r.runs()
            time.sleep(0.2)
    finally:
        r.stop()


def test_two_server_processes_never_sync_the_same_pair_at_once(tmp_path: Path) -> None:
    """Server A's run is held in flight by the platform; a webhook to server B queues a run that B takes
    and that must wait for the pair's lock: B sends nothing until A's run has ended."""
    cfg = write_config(tmp_path)
    with HoldingMeta(hold_at=1) as emu:
        cfg.write_text(cfg.read_text().replace("sandbox = true", f'graph_url = "{emu.url}"'))
        env = {**os.environ, "CONNECTOR_CONFIG": str(cfg), "CONNECTOR_WEBHOOK_DEBOUNCE_SECONDS": "0",
               "CONNECTOR_DESTINATIONS__META__ACCESS_TOKEN": "sandbox-token"}  # fmt: skip
        ports = [free_port(), free_port()]
        procs = [start_serve([sys.executable, "-m", "connector.cli", "serve", "--port", str(p)], env, p,
                             tmp_path / f"serve{p}.err") for p in ports]  # fmt: skip
        ledger = Journal(f"sqlite:///{tmp_path / 'state' / 'ledger.db'}")
        try:

            def webhook(port: int, event: str) -> None:
                stamp, body = str(int(time.time())), json.dumps({"event_id": event}).encode()
                resp = httpx.post(f"http://127.0.0.1:{port}/webhooks/segments/vip", content=body, headers={
                    "X-Connector-Timestamp": stamp, "X-Connector-Signature": sign(SECRET, stamp, body)})  # fmt: skip
                assert resp.status_code == 202, resp.text

            webhook(ports[0], "a")
            assert emu.arrived.wait(60), "server A's run never sent its batch"
            webhook(ports[1], "b")
            coord = Coordinator(ledger)
            # generous: on a loaded 2-core machine (the suite on two workers) B's poll can lag well past 30 s
            deadline = time.time() + 90
            while coord.pending():  # taken by B (A is busy in its run), which now waits for the pair's lock
                assert time.time() < deadline, "nobody took the second run"
                time.sleep(0.05)
            # B's run stays queued while it waits for the lock; A's is in flight
            assert emu.adds == 1 and [r.status for r in ledger.list_runs()] == ["queued", "running"]
            emu.release.set()
            deadline = time.time() + 60
            while True:
                runs = ledger.list_runs()
                if all(r.status not in ("queued", "running") for r in runs):
                    break
                assert time.time() < deadline, [(r.status, r.trigger) for r in runs]
                time.sleep(0.1)
            assert [(r.status, r.counts["adds"]) for r in runs] == [("success", 0), ("success", 50)], runs
            spans = sorted((r.started_at, r.ended_at) for r in runs)
            assert spans[0][1] is not None and spans[0][1] <= spans[1][0], "two servers synced the same pair at once"
        finally:
            emu.release.set()
            ledger.close()
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                assert proc.wait(timeout=60) == 0


def test_serve_exits_0_after_sigterm_and_logs_what_it_runs(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, schedule="0 3 * * *")
    port = free_port()
    env = {**os.environ, "CONNECTOR_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "-m", "connector.cli", "serve", "--port", str(port)], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "server did not start"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err  # uvicorn re-raised SIGTERM after its graceful shutdown: 143
    assert "schedules active: vip (0 3 * * *, UTC)" in err
    assert "webhooks: enabled (HMAC signature)" in err
    assert "shutting down" in err and "stopped" in err
    assert SECRET not in err


def test_webhooks_and_runs_are_logged_without_secret_or_signature(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="connector.server")
    r = Running(write_config(tmp_path))
    try:
        body = json.dumps({"event_id": "evt-log"}).encode()
        stamp = str(int(time.time()))
        signature = sign(SECRET, stamp, body)
        assert r.post(body, ts=float(stamp)).status_code == 202
        r.wait_idle()
        assert r.post(b"{}", secret="wrong-secret").status_code == 401
        assert r.post(b"{}", segment="nope").status_code == 404
    finally:
        r.stop()
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "connector.server"]
    text = "\n".join(messages)
    assert "webhooks: enabled (HMAC signature)" in text and "schedules active: none" in text
    assert any(m.startswith("webhook for segment 'vip' accepted: queued, run ids ") for m in messages), text
    assert any(m.startswith("run start: vip -> meta (trigger webhook") for m in messages), text
    assert any(m.startswith("run end: vip -> meta success (run ") and "50 adds" in m for m in messages), text
    assert "webhook for segment 'vip' refused: 401 bad signature" in text
    assert "webhook for segment 'nope' refused: 404 unknown segment 'nope'" in text
    assert SECRET not in caplog.text and signature not in caplog.text and "wrong-secret" not in caplog.text


def test_webhooks_disabled_is_logged_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace(f'webhook_secret = "{SECRET}"\n', ""))
    caplog.set_level(logging.INFO, logger="connector.server")
    r = Running(cfg)
    r.stop()
    assert "webhooks: disabled (set CONNECTOR_WEBHOOK_SECRET or CONNECTOR_WEBHOOK_BEARER_TOKEN to enable them)" in caplog.text


def test_every_metrics_family_has_help_and_type(running: Running) -> None:
    assert running.post(json.dumps({"event_id": "evt-metrics"}).encode()).status_code == 202
    running.wait_idle()
    text = httpx.get(f"{running.url}/metrics", timeout=10).text
    helped: set[str] = set()
    typed: set[str] = set()
    families: list[str] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            assert name in helped and name in typed, f"{name} has no HELP or TYPE"
            if not families or families[-1] != name:
                assert name not in families, f"samples of {name} are not together"
                families.append(name)
    assert {"connector_runs_total", "connector_queue_length", "connector_retries_total",
            "connector_throttle_wait_seconds_total"} <= set(families)  # fmt: skip
