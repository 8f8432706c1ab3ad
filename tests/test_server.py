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

import httpx
import pytest
import uvicorn

from connector.ledger.journal import Journal
from connector.locks import Coordinator
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
        while not self.server.started and time.time() < deadline:
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
    time.sleep(0.5)
    assert running.runs() == []
    assert running.post(body).status_code == 202
    assert running.post(body).status_code == 409  # same event_id: a replay
    running.wait_idle()
    assert len(running.runs()) == 1


def test_fifty_webhooks_during_a_run_make_one_more_run(tmp_path: Path) -> None:
    """Triggers that arrive while a run is in progress coalesce into one queued run. (The run is a
    20,000-member sync, so the webhooks arrive during it however busy the machine is; an earlier
    version of this test timed the 50 requests instead, which failed on a loaded machine.)"""
    from concurrent.futures import ThreadPoolExecutor

    r = Running(write_config(tmp_path, n=20_000))
    try:
        assert r.post(json.dumps({"event_id": "first"}).encode()).status_code == 202
        deadline = time.time() + 20
        while httpx.get(f"{r.url}/healthz").json()["running"] != "vip":
            assert time.time() < deadline
            time.sleep(0.02)
        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(lambda i: r.post(json.dumps({"event_id": f"e{i}"}).encode()).status_code, range(50)))
        # no run has ended yet: every webhook arrived while the first run was in progress
        first_still_running = not [x for x in r.runs() if x["status"] not in ("running", "queued")]
        assert codes.count(202) == 50
        r.wait_idle(60)
        runs = r.runs()
        assert all(x["status"] == "success" for x in runs), runs
        # all 50 during the first run: one more run; the first ended while they arrived: at most two more
        assert len(runs) == 2 if first_still_running else 2 <= len(runs) <= 3, runs
    finally:
        r.stop()


def test_schedule_during_a_webhook_run_does_not_overlap(tmp_path: Path) -> None:
    r = Running(write_config(tmp_path, n=20_000))
    try:
        assert r.post(b"{}").status_code == 202
        deadline = time.time() + 20
        while httpx.get(f"{r.url}/healthz").json()["running"] != "vip":  # the webhook's run has started
            assert time.time() < deadline
            time.sleep(0.02)
        r.service.trigger("vip", None, "schedule")  # what the scheduler does when the cron fires
        r.service.trigger("vip", None, "schedule")
        r.wait_idle(60)
        runs = sorted(r.runs(), key=lambda x: str(x["started_at"]))
        assert [x["trigger"] for x in runs] == ["webhook", "schedule"]
        assert str(runs[0]["ended_at"]) <= str(runs[1]["started_at"])
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
    ledger = Journal(f"sqlite:///{tmp_path / 'l.db'}")
    dead = Coordinator(ledger, lease_seconds=0.2, holder="dead")
    alive = Coordinator(ledger, lease_seconds=5, holder="alive")
    assert dead.try_acquire("s", "d") is None
    assert alive.try_acquire("s", "d") == "dead"
    time.sleep(0.3)
    assert alive.try_acquire("s", "d") is None
    ledger.close()


def test_sigterm_mid_sync_leaves_a_consistent_ledger_and_the_next_start_completes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, n=60_000)
    port = free_port()
    env = {**os.environ, "CONNECTOR_CONFIG": str(cfg)}
    cmd = [sys.executable, "-m", "connector.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "server did not start"
                time.sleep(0.1)
        stamp = str(int(time.time()))
        httpx.post(f"{url}/webhooks/segments/vip", content=b"{}", headers={
            "X-Connector-Timestamp": stamp, "X-Connector-Signature": sign(SECRET, stamp, b"{}")})  # fmt: skip
        ledger = Journal(f"sqlite:///{tmp_path / 'state' / 'ledger.db'}")
        while ledger.counts("vip", "meta").get("confirmed", 0) == 0:  # at least one batch committed
            assert time.time() < deadline + 60
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        counts = ledger.counts("vip", "meta")
        assert counts.get("confirmed", 0) % 10_000 == 0 and sum(counts.values()) == 60_000
        statuses = [r.status for r in ledger.list_runs()]
        # interrupted after a committed batch, the rest queued again for the next start
        assert statuses[:2] == ["queued", "interrupted"] or statuses[0] == "success", statuses
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while ledger.counts("vip", "meta").get("confirmed", 0) < 60_000:
            assert time.time() < deadline, ledger.counts("vip", "meta")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    state = json.loads((tmp_path / "state" / "sandbox-meta-meta.json").read_text())
    (aud,) = state["audiences"].values()
    assert len(aud["rows"]) == 60_000
    ledger.close()


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
    cfg = write_config(tmp_path, n=20_000)
    ports = [free_port(), free_port()]
    env = {**os.environ, "CONNECTOR_CONFIG": str(cfg), "CONNECTOR_WEBHOOK_DEBOUNCE_SECONDS": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", "connector.cli", "serve", "--port", str(p)], env=env,
                              stderr=subprocess.DEVNULL) for p in ports]  # fmt: skip
    try:
        for p in ports:
            deadline = time.time() + 30
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    assert time.time() < deadline
                    time.sleep(0.1)
        for _ in range(2):
            for p in ports:
                stamp = str(int(time.time()))
                body = json.dumps({"event_id": f"{p}-{time.time()}"}).encode()
                resp = httpx.post(f"http://127.0.0.1:{p}/webhooks/segments/vip", content=body, headers={
                    "X-Connector-Timestamp": stamp, "X-Connector-Signature": sign(SECRET, stamp, body)})  # fmt: skip
                assert resp.status_code == 202
            time.sleep(0.3)
        ledger = Journal(f"sqlite:///{tmp_path / 'state' / 'ledger.db'}")
        deadline = time.time() + 120
        while True:
            runs = ledger.list_runs()
            if len(runs) >= 2 and all(r.status not in ("queued", "running") for r in runs):
                break
            assert time.time() < deadline, [(r.status, r.trigger) for r in runs]
            time.sleep(0.2)
        spans = sorted((r.started_at, r.ended_at) for r in runs if r.ended_at)
        assert len(spans) >= 2
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end is not None and end <= start, "two servers synced the same pair at once"
        ledger.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)


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
