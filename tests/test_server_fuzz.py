"""Hostile webhook input (issue 6 groundwork): arbitrary headers and bodies never crash the server and
never trigger a sync unless correctly signed. Runs the ASGI app in-process (no network), derandomized."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.server import SyncService, create_app, sign
from connector.settings import load_settings

SECRET = "fuzz-secret-abc"


def make_app(tmp: Path) -> tuple[object, SyncService]:
    (tmp / "m.csv").write_text("id,email\n1,a@example.com\n")
    cfg = tmp / "c.toml"
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
""")
    s = load_settings(cfg)
    svc = SyncService(s)
    return create_app(s, svc, start_service=False), svc


def test_fuzzed_webhooks_never_crash_or_trigger(tmp_path: Path) -> None:
    app, svc = make_app(tmp_path)
    accepted: list[bytes] = []

    async def post(path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=body, headers=headers)

    header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)

    @settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        segment=st.sampled_from(["vip", "nope", "vip%00", "../vip"]),
        body=st.one_of(st.binary(max_size=300), st.just(b'{"event_id": "x"}'), st.just(b"[]")),
        ts=st.one_of(header_value, st.just(str(int(time.time())))),
        sig=st.one_of(header_value, st.just("sha256=" + "0" * 64)),
        bearer=st.one_of(st.none(), header_value),
    )
    def one(segment: str, body: bytes, ts: str, sig: str, bearer: str | None) -> None:
        headers = {"X-Connector-Timestamp": ts, "X-Connector-Signature": sig}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        resp = asyncio.run(post(f"/webhooks/segments/{segment}", body, headers))
        assert resp.status_code < 500, resp.text
        if resp.status_code == 202:
            accepted.append(body)

    one()
    assert accepted == [] and svc.coord.pending() == []
    # and a correctly signed request is still accepted
    stamp = str(int(time.time()))
    ok = asyncio.run(post("/webhooks/segments/vip", b"{}", {"X-Connector-Timestamp": stamp,
                                                             "X-Connector-Signature": sign(SECRET, stamp, b"{}")}))  # fmt: skip
    assert ok.status_code == 202 and svc.coord.pending() == ["vip"]
    svc.engine.close()
    svc.ledger.close()
