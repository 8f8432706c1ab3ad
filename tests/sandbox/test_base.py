"""What every emulator's persistence promises: an Arrow snapshot plus a journal of frames; a process killed
mid-run leaves state that loading replays; a torn or corrupt last frame is cut off, never applied; a
journal already folded into a snapshot is never replayed; an older emulator's JSON state is set aside."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from connector.clock import FakeClock
from connector.identifiers.hashing import sha256_hex
from connector.sandbox import base
from connector.sandbox.base import collector_paused, frame, read_journal
from connector.sandbox.google_datamanager import DataManagerEmulator
from connector.sandbox.meta_graph import MetaGraphEmulator

ACCOUNT = "1234567890"
TOKEN = "sandbox-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def new_list(http: httpx.Client, name: str = "vip") -> str:
    r = http.post(f"/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists", json={"displayName": name})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def person(i: int, consent: int = 0) -> dict[str, Any]:
    m: dict[str, Any] = {"userData": {"userIdentifiers": [{"emailAddress": sha256_hex(f"u{i}@x.com")},
                                                          {"phoneNumber": sha256_hex(f"+1415555{i:04d}")}]}}  # fmt: skip
    if consent:
        m["consent"] = {"adUserData": 1, "adPersonalization": consent}
    return m


def call(http: httpx.Client, method: str, lid: str, people: list[dict[str, Any]]) -> None:
    body: dict[str, Any] = {"destinations": [{"operatingAccount": {"accountType": 1, "accountId": ACCOUNT},
                                              "productDestinationId": lid}],
                            "audienceMembers": people, "encoding": 1}  # fmt: skip
    if method == "ingest":
        body["termsOfService"] = {"customerMatchTermsOfServiceStatus": 1}
    r = http.post(f"/v1/audienceMembers:{method}", json=body)
    assert r.status_code == 200, r.text


def emails(emu: DataManagerEmulator, lid: str) -> set[str]:
    return {dict(m)["email"] for m in emu.members(lid)}


# ---------------------------------------------------------------------------- frames


def test_a_cut_anywhere_in_the_last_frame_leaves_the_frames_before_it() -> None:
    rows = pa.table({"key": pa.array([b"a" * 66, b"b" * 66]), "value": pa.array([1.5, None])})
    frames = [frame({"generation": 3}), frame({"op": "add", "id": "1"}, rows), frame({"op": "del", "id": "1"}, rows)]
    whole = b"".join(frames)
    entries, valid = read_journal(whole)
    assert valid == len(whole) and [e for e, _ in entries] == [{"generation": 3}, {"op": "add", "id": "1"},
                                                               {"op": "del", "id": "1"}]  # fmt: skip
    assert entries[0][1] is None and entries[1][1] is not None and entries[1][1].equals(rows)
    kept = len(frames[0]) + len(frames[1])
    for cut in range(kept, len(whole)):
        entries, valid = read_journal(whole[:cut])
        assert valid == kept and len(entries) == 2, cut


def test_a_corrupt_frame_ends_the_journal() -> None:
    frames = [frame({"generation": 0}), frame({"op": "drop", "id": "1"}), frame({"op": "drop", "id": "2"})]
    damaged = bytearray(b"".join(frames))
    damaged[len(frames[0]) + 12] ^= 0xFF  # a bit flipped in the second frame's header: its CRC-32 fails
    entries, valid = read_journal(bytes(damaged))
    assert [e for e, _ in entries] == [{"generation": 0}] and valid == len(frames[0])


# ---------------------------------------------------------------------------- crashes

EMULATOR = """
import sys, time
from pathlib import Path
from connector.sandbox.google_datamanager import DataManagerEmulator
emu = DataManagerEmulator(state_file=Path(sys.argv[1]))
print(emu.start(), flush=True)
time.sleep(600)
"""


def test_a_process_killed_mid_run_leaves_a_journal_that_loading_replays(tmp_path: Path) -> None:
    state = tmp_path / "dm.json"
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        with httpx.Client(base_url=url, timeout=60) as http:
            lid = new_list(http)
            call(http, "ingest", lid, [person(i, consent=1) for i in range(100)])
            call(http, "ingest", lid, [person(i, consent=2) for i in range(50, 150)])
            call(http, "remove", lid, [person(i) for i in range(10)])
    finally:
        proc.kill()  # SIGKILL: no stop(), no snapshot
        proc.wait()
    journal = state.with_name("dm.json.journal")
    assert not state.exists() and journal.exists()
    with DataManagerEmulator(state_file=state) as e:
        assert emails(e, lid) == {sha256_hex(f"u{i}@x.com") for i in range(10, 150)}
        consent = {dict(m)["email"]: c for m, c in e.member_consent(lid).items()}
        assert consent[sha256_hex("u20@x.com")] == ("GRANTED", "GRANTED")
        assert consent[sha256_hex("u60@x.com")] == ("GRANTED", "DENIED")  # the later ingest's consent
    assert state.exists() and not journal.exists()  # stop() folded the replayed journal into a snapshot


def test_a_torn_last_frame_is_a_call_never_received(tmp_path: Path) -> None:
    state = tmp_path / "dm.json"
    e = DataManagerEmulator(state_file=state)
    e.start()
    with httpx.Client(base_url=e.url) as http:
        lid = new_list(http)
        call(http, "ingest", lid, [person(i) for i in range(5)])
        before = state.with_name("dm.json.journal").stat().st_size
        call(http, "ingest", lid, [person(i) for i in range(5, 9)])
    e._stop_server()  # killed: no snapshot
    journal = state.with_name("dm.json.journal")
    data = journal.read_bytes()
    # killed while writing the second ingest's frames (its rows, then its request status)
    journal.write_bytes(data[: before + (len(data) - before) // 3])
    again = DataManagerEmulator(state_file=state)
    again.start()
    assert emails(again, lid) == {sha256_hex(f"u{i}@x.com") for i in range(5)}
    assert journal.stat().st_size == before  # cut off, so the next frames are not appended behind it
    with httpx.Client(base_url=again.url) as http:
        call(http, "ingest", lid, [person(9)])
    again._stop_server()  # killed again
    with DataManagerEmulator(state_file=state) as third:
        assert emails(third, lid) == {sha256_hex(f"u{i}@x.com") for i in (*range(5), 9)}


def test_a_journal_already_folded_into_the_snapshot_is_never_replayed(tmp_path: Path) -> None:
    """The process died between writing the snapshot and deleting the journal: the journal is older than the
    snapshot and must not bring back members removed since."""
    state = tmp_path / "meta.json"
    journal = state.with_name("meta.json.journal")
    rows = [[sha256_hex(f"u{i}@x.com")] for i in range(3)]
    session = json.dumps({"session_id": 1, "batch_seq": 1, "last_batch_flag": True})

    def upload(http: httpx.Client, aid: str, data: list[list[str]], **extra: str) -> None:
        r = http.post(f"/{aid}/users", data={"payload": json.dumps({"schema": "EMAIL_SHA256", "data": data}),
                                             "session": session, **extra})  # fmt: skip
        assert r.status_code == 200, r.text

    with MetaGraphEmulator(state_file=state) as e, httpx.Client(base_url=e.url, headers=AUTH) as http:
        aid = http.post("/act_1/customaudiences", data={"name": "vip", "subtype": "CUSTOM",
                                                        "customer_file_source": "USER_PROVIDED_ONLY"}).json()["id"]  # fmt: skip
        upload(http, aid, rows)
        stale = journal.read_bytes()
    with MetaGraphEmulator(state_file=state) as e, httpx.Client(base_url=e.url, headers=AUTH) as http:
        upload(http, aid, rows[:1], method="DELETE")
    journal.write_bytes(stale)
    with MetaGraphEmulator(state_file=state) as e:
        assert e.members(aid) == {(r[0],) for r in rows[1:]}
        assert not journal.exists()


# ---------------------------------------------------------------------------- snapshot


def test_the_snapshot_is_an_arrow_file_of_the_members(tmp_path: Path) -> None:
    state, clock = tmp_path / "dm.json", FakeClock()
    with DataManagerEmulator(state_file=state, clock=clock) as e, httpx.Client(base_url=e.url) as http:
        lid = new_list(http)
        call(http, "ingest", lid, [person(i, consent=2) for i in range(20)])
        empty = new_list(http, "empty")
    with pa.memory_map(str(state)) as source:
        table = pa.ipc.open_file(source).read_all()
    meta = json.loads(table.schema.metadata[b"connector.sandbox"])
    assert table.num_rows == 20 and table.schema.names == ["key", "stamp"]
    assert meta["members"] == [[lid, 20], [empty, 0]] and meta["generation"] == 1
    assert set(meta["state"]["lists"]) == {lid, empty} and len(meta["state"]["requests"]) == 1
    assert not state.with_name("dm.json.journal").exists()
    with DataManagerEmulator(state_file=state, clock=clock) as again:
        assert again.member_count(lid) == 20 and again.member_count(empty) == 0
        assert set(again.member_consent(lid).values()) == {("GRANTED", "DENIED")}


def test_a_long_run_folds_its_journal_into_a_snapshot_and_carries_on(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(base, "COMPACT_MIN_BYTES", 4096)
    state = tmp_path / "dm.json"
    journal = state.with_name("dm.json.journal")
    e = DataManagerEmulator(state_file=state)
    e.start()
    with httpx.Client(base_url=e.url) as http:
        lid = new_list(http)
        for batch in range(6):
            call(http, "ingest", lid, [person(i) for i in range(batch * 20, batch * 20 + 20)])
        assert state.exists()  # folded during the run
        call(http, "remove", lid, [person(0)])
    e._stop_server()  # killed after the fold: the snapshot, then a journal of its generation
    frames, _ = read_journal(journal.read_bytes())
    assert frames[0][0] == {"generation": e._generation} and e._generation >= 1
    with DataManagerEmulator(state_file=state) as again:
        assert emails(again, lid) == {sha256_hex(f"u{i}@x.com") for i in range(1, 120)}


def test_an_older_emulators_json_state_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "meta.json"
    state.write_text(json.dumps({"generation": 2, "next_id": 10**14, "audiences": {}}))
    state.with_name("meta.json.journal").write_text('{"generation": 2}\n{"op":"drop","id":"1"}\n')
    with MetaGraphEmulator(state_file=state) as e:
        assert e.audiences == {}
    assert "set aside" in caplog.text
    assert state.with_name("meta.json.old").exists() and state.with_name("meta.json.journal.old").exists()
    with pa.memory_map(str(state)) as source:  # the new snapshot
        assert pa.ipc.open_file(source).read_all().num_rows == 0


# ---------------------------------------------------------------------------- the collector


def test_the_collector_is_paused_while_requests_are_handled_and_restored_after() -> None:
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other_request() -> None:
        with collector_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other_request)
    with collector_paused():
        assert not gc.isenabled()
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other request is still being handled
    release.set()
    t.join(10)
    assert gc.isenabled()
    gc.disable()  # a host that turned the collector off keeps it off
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
