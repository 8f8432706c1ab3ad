"""A bounded load test of a real `connector serve` process on loopback: 2,000 webhook requests, signed
and forged, sent 40 at a time. Zero accepted forgeries, zero server errors, the server stays healthy
and its memory stays bounded; every signed request is accepted once and replays are refused."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from connector.server import sign

SECRET = "whsec-load-7f3a9b"
SEGMENT_ROWS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_idle(base: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while (h := httpx.get(f"{base}/healthz", timeout=10).json())["running"] or h["queued"]:
        assert time.time() < deadline, h
        time.sleep(0.2)


def requests(rng: random.Random, n: int) -> list[tuple[str, bytes, dict[str, str], str]]:
    """(segment, body, headers, kind) with kind 'signed' for the only ones that may be accepted."""
    out = []
    captured: tuple[bytes, dict[str, str]] | None = None
    for i in range(n):
        now = str(int(time.time()))
        body = json.dumps({"event_id": f"evt-{i}"}).encode()
        good = {"X-Connector-Timestamp": now, "X-Connector-Signature": "sha256=" + sign(SECRET, now, body)}
        kind = rng.choice(["signed", "bad_sig", "wrong_secret", "stale", "nan_ts", "replay", "unsigned", "bearer",
                           "tampered", "oversized", "unknown_segment"])  # fmt: skip
        segment, headers = "vip", dict(good)
        if kind == "signed":
            captured = (body, good)
        elif kind == "bad_sig":
            headers["X-Connector-Signature"] = "sha256=" + f"{rng.getrandbits(256):064x}"
        elif kind == "wrong_secret":
            headers["X-Connector-Signature"] = "sha256=" + sign(SECRET + "x", now, body)
        elif kind == "stale":
            old = str(int(time.time()) - 3600)
            headers = {"X-Connector-Timestamp": old, "X-Connector-Signature": sign(SECRET, old, body)}
        elif kind == "nan_ts":
            headers = {"X-Connector-Timestamp": "nan", "X-Connector-Signature": sign(SECRET, "nan", body)}
        elif kind == "replay":
            if captured is None:
                kind, headers = "unsigned", {}
            else:
                body, headers = captured
        elif kind == "unsigned":
            headers = {}
        elif kind == "bearer":
            headers = {"Authorization": f"Bearer {SECRET}"}  # the signing secret is not a bearer token
        elif kind == "tampered":
            body = json.dumps({"event_id": f"evt-{i}", "destinations": ["meta"]}).encode()
        elif kind == "oversized":
            body = b'{"pad": "' + b"x" * (70 * 1024) + b'"}'
            headers = {"X-Connector-Timestamp": now, "X-Connector-Signature": sign(SECRET, now, body)}
        elif kind == "unknown_segment":
            segment = "nope"
        out.append((segment, body, headers, kind))
    return out


def test_two_thousand_requests_no_forgery_no_crash_bounded_memory(tmp_path: Path) -> None:
    with (tmp_path / "m.csv").open("w") as f:
        f.write("id,email\n" + "".join(f"C{i},user{i}@example.com\n" for i in range(SEGMENT_ROWS)))
    (tmp_path / "connector.toml").write_text("""state_dir = "state"
webhook_debounce_seconds = 0.2
[destinations.meta]
type = "meta"
ad_account_id = "act_1"
sandbox = true
[segments.vip]
source = { type = "csv", path = "m.csv" }
key = "id"
identifiers = { email = "email" }
destinations = ["meta"]
""")
    port = free_port()
    env = {**os.environ, "CONNECTOR_WEBHOOK_SECRET": SECRET}
    server = subprocess.Popen([sys.executable, "-m", "connector", "serve", "--config", str(tmp_path / "connector.toml"),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "serve.err").open("wb"))  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and server.poll() is None, (tmp_path / "serve.err").read_text()
            time.sleep(0.1)

        async def fire(batch: list[tuple[str, bytes, dict[str, str], str]]) -> list[tuple[str, int]]:
            sem = asyncio.Semaphore(40)
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:

                async def one(seg: str, body: bytes, headers: dict[str, str], kind: str) -> tuple[str, int]:
                    async with sem:
                        r = await client.post(f"/webhooks/segments/{seg}", content=body,
                                              headers={"Content-Type": "application/json", **headers})  # fmt: skip
                        return kind, r.status_code

                return await asyncio.gather(*(one(*req) for req in batch))

        rng = random.Random(6)
        warm = asyncio.run(fire(requests(rng, 100)))  # warm up: imports, first sync, caches
        assert all(status < 500 for _, status in warm) and ("signed", 202) in warm, warm
        wait_idle(base)  # the first sync (SDK imports, emulator) is done before the baseline is read
        before = rss_kib(server.pid)
        batch = requests(rng, 2000)
        t0 = time.monotonic()
        results = asyncio.run(fire(batch))
        elapsed = time.monotonic() - t0
        after = rss_kib(server.pid)

        by_kind: dict[str, Counter[int]] = {}
        for kind, status in results:
            by_kind.setdefault(kind, Counter())[status] += 1
        assert all(status < 500 for _, status in results), by_kind
        accepted = {k: c[202] for k, c in by_kind.items() if c[202]}
        assert set(accepted) <= {"signed", "replay"}, by_kind  # zero accepted forgeries
        # a signed request and its replays race: exactly one of them is accepted, the others get 409
        identities: dict[bytes, Counter[int]] = {}
        for (_, body, _, kind), (_, status) in zip(batch, results, strict=True):
            if kind in ("signed", "replay"):
                identities.setdefault(body, Counter())[status] += 1
        assert all(c[202] == 1 and set(c) <= {202, 409} for c in identities.values()), identities
        accepted = {"signed": len(identities)}
        assert set(by_kind["oversized"]) == {413}
        for kind in ("bad_sig", "wrong_secret", "stale", "nan_ts", "unsigned", "bearer", "tampered"):
            assert set(by_kind[kind]) == {401}, (kind, by_kind[kind])
        assert after - before < 64 * 1024, f"RSS grew {before} -> {after} KiB"
        # still healthy, and the accepted webhooks made a few coalesced runs, all successful
        wait_idle(base)
        runs = httpx.get(f"{base}/runs", timeout=10).json()["runs"]
        assert runs and all(r["status"] == "success" for r in runs), runs
        # bursts coalesce: one run per 0.2 s settle window at most, far fewer runs than accepted webhooks
        assert len(runs) <= elapsed / 0.2 + 2 and len(runs) < accepted["signed"] / 2, (len(runs), elapsed)
        print(f"load: {len(results)} requests in {elapsed:.1f} s, {accepted['signed']} accepted, {len(runs)} runs, "
              f"RSS {before // 1024} -> {after // 1024} MiB; {dict(sorted((k, dict(v)) for k, v in by_kind.items()))}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    # nothing the server wrote (its log, the ledger, the sandbox state) holds the webhook secret
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "connector.toml":
            assert SECRET.encode() not in path.read_bytes(), path
