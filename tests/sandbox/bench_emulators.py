"""How long each bundled emulator takes for 30 write calls of 10,000 rows (a 300k-member sync), with a
state file (as in the sandbox). Not a test: run it by hand and compare before/after a change.

    .venv/bin/python tests/sandbox/bench_emulators.py [--calls 30] [--rows 10000]

Request bodies are built once, before the clock starts, in the shape the official clients send, so
the figures are the emulators' own cost (HTTP/gRPC included), not the clients'.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import httpx


def _h(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _rows(call: int, n: int) -> list[tuple[str, str]]:
    return [(_h(f"u{call}-{i}@x.com"), _h(f"+1415{call:03d}{i:05d}")) for i in range(n)]


def bench_datamanager(state: Path, calls: int, n: int) -> float:
    from connector.sandbox.google_datamanager import DataManagerEmulator

    with DataManagerEmulator(state_file=state / "dm.json") as emu, httpx.Client(base_url=emu.url, timeout=600) as http:
        ul = http.post("/v1/accountTypes/GOOGLE_ADS/accounts/1234567890/userLists",
                       json={"displayName": "bench", "membershipDuration": "46656000s"}).json()  # fmt: skip
        dest = [{"operatingAccount": {"accountType": 1, "accountId": "1234567890"}, "productDestinationId": str(ul["id"])}]
        bodies = []
        for c in range(calls):
            members = [{"userData": {"userIdentifiers": [{"emailAddress": e}, {"phoneNumber": p}]},
                        "consent": {"adUserData": 1, "adPersonalization": 1}} for e, p in _rows(c, n)]  # fmt: skip
            bodies.append(json.dumps({"destinations": dest, "audienceMembers": members, "encoding": 1,
                                      "termsOfService": {"customerMatchTermsOfServiceStatus": 1}}).encode())  # fmt: skip
        started = time.perf_counter()
        for body in bodies:
            r = http.post("/v1/audienceMembers:ingest", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text[:300]
        took = time.perf_counter() - started
        assert emu.member_count(str(ul["id"])) == calls * n
    return took


def bench_meta(state: Path, calls: int, n: int) -> float:
    from connector.sandbox.meta_graph import MetaGraphEmulator

    with MetaGraphEmulator(state_file=state / "meta.json") as emu, httpx.Client(base_url=emu.url, timeout=600) as http:
        auth = {"Authorization": "Bearer sandbox-token"}
        aid = http.post("/v26.0/act_1/customaudiences", headers=auth, data={
            "name": "bench", "subtype": "CUSTOM", "customer_file_source": "USER_PROVIDED_ONLY"}).json()["id"]  # fmt: skip
        bodies = []
        for c in range(calls):
            payload = json.dumps({"schema": ["EMAIL", "PHONE"], "data": [list(r) for r in _rows(c, n)]},
                                 separators=(",", ":"))  # fmt: skip
            session = json.dumps({"session_id": 7, "batch_seq": c + 1, "last_batch_flag": c == calls - 1,
                                  "estimated_num_total": calls * n})  # fmt: skip
            bodies.append(urlencode({"payload": payload, "session": session}).encode())  # a form, as clients send it
        started = time.perf_counter()
        form = {**auth, "content-type": "application/x-www-form-urlencoded"}
        for body in bodies:
            r = http.post(f"/v26.0/{aid}/users", headers=form, content=body)
            assert r.status_code == 200, r.text[:300]
        took = time.perf_counter() - started
        assert emu.member_count(aid) == calls * n
    return took


def bench_google_ads(state: Path, calls: int, n: int) -> float:
    from google.ads.googleads.v26.common.types import offline_user_data as cod
    from google.ads.googleads.v26.services.types import offline_user_data_job_service as ojs

    from connector.sandbox.google_ads import API, SANDBOX_DEVELOPER_TOKEN, GoogleAdsEmulator
    from connector.sandbox.tls import localhost_certificate

    cert, _ = localhost_certificate()
    with GoogleAdsEmulator(state_file=state / "ads.json") as emu:
        channel = grpc.secure_channel(emu.endpoint, grpc.ssl_channel_credentials(root_certificates=cert),
                                      options=[("grpc.max_send_message_length", 256 << 20),
                                               ("grpc.max_receive_message_length", 256 << 20)])  # fmt: skip
        md: Any = (("developer-token", SANDBOX_DEVELOPER_TOKEN),)

        def call(service: str, method: str, body: bytes) -> bytes:
            fn = channel.unary_unary(f"/{API}.{service}/{method}")
            out: bytes = fn(body, metadata=md, timeout=600)
            return out

        from google.ads.googleads.v26.resources.types import user_list as ul_res
        from google.ads.googleads.v26.services.types import user_list_service as uls

        ul = ul_res.UserList(name="bench", membership_life_span=540)
        ul.crm_based_user_list.upload_key_type = 2  # CONTACT_INFO
        op = uls.UserListOperation(create=ul)
        raw = call("UserListService", "MutateUserLists",
                   uls.MutateUserListsRequest.serialize(uls.MutateUserListsRequest(customer_id="1234567890",
                                                                                   operations=[op])))  # fmt: skip
        list_name = uls.MutateUserListsResponse.deserialize(raw).results[0].resource_name
        job = ojs.CreateOfflineUserDataJobRequest(customer_id="1234567890")
        job.job.type_ = 4  # CUSTOMER_MATCH_USER_LIST
        job.job.customer_match_user_list_metadata.user_list = list_name
        job.job.customer_match_user_list_metadata.consent.ad_user_data = 2  # GRANTED (ConsentStatus)
        job.job.customer_match_user_list_metadata.consent.ad_personalization = 2
        bodies = []
        for c in range(calls):
            ops = [ojs.OfflineUserDataJobOperation(create=cod.UserData(user_identifiers=[
                cod.UserIdentifier(hashed_email=e), cod.UserIdentifier(hashed_phone_number=p)])) for e, p in _rows(c, n)]  # fmt: skip
            bodies.append(ops)
        started = time.perf_counter()
        raw = call("OfflineUserDataJobService", "CreateOfflineUserDataJob", ojs.CreateOfflineUserDataJobRequest.serialize(job))
        name = ojs.CreateOfflineUserDataJobResponse.deserialize(raw).resource_name
        serialized = [ojs.AddOfflineUserDataJobOperationsRequest.serialize(ojs.AddOfflineUserDataJobOperationsRequest(
            resource_name=name, operations=ops, enable_partial_failure=True)) for ops in bodies]  # fmt: skip
        started = time.perf_counter()  # the serialization above is the client's cost
        for body in serialized:
            call("OfflineUserDataJobService", "AddOfflineUserDataJobOperations", body)
        call("OfflineUserDataJobService", "RunOfflineUserDataJob",
             ojs.RunOfflineUserDataJobRequest.serialize(ojs.RunOfflineUserDataJobRequest(resource_name=name)))  # fmt: skip
        lid = list_name.rsplit("/", 1)[-1]
        count = emu.member_count(lid)
        took = time.perf_counter() - started
        assert count == calls * n, count
        channel.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--only", choices=["datamanager", "meta", "google_ads"])
    args = ap.parse_args()
    benches = {"datamanager": bench_datamanager, "meta": bench_meta, "google_ads": bench_google_ads}
    print(f"{'emulator':<12} {'calls':>5} {'rows/call':>9} {'seconds':>8} {'rows/s':>9}")
    for name, fn in benches.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            took = fn(Path(tmp), args.calls, args.rows)
        print(f"{name:<12} {args.calls:>5} {args.rows:>9} {took:>8.2f} {args.calls * args.rows / took:>9,.0f}")


if __name__ == "__main__":
    main()
