"""A ledger of the row-per-member design (schema 7) is converted on first open, losing nothing."""

from __future__ import annotations

import json
import sqlite3

from conftest import Harness, person, write_csv

from connector.identifiers.hashing import member_key
from connector.identifiers.normalize import Normalizer

FIELDS = ["email", "phone", "first_name", "last_name", "zip", "country"]


def legacy_ledger(h: Harness, members: list[tuple[str, dict[str, str], str, str | None]]) -> None:
    """A schema-7 SQLite ledger holding `members` (key, payload, state, prev_payload) of vip -> meta."""
    (h.dir / "state").mkdir()
    con = sqlite3.connect(h.dir / "state" / "ledger.db")
    con.executescript("""
        CREATE TABLE ledger_meta (key VARCHAR(100) PRIMARY KEY, value VARCHAR(200) NOT NULL);
        INSERT INTO ledger_meta VALUES ('schema', '7'), ('ledger_id', 'abc');
        CREATE TABLE members (segment VARCHAR(200), destination VARCHAR(200), member_key VARCHAR(64),
            fingerprint BIGINT NOT NULL, payload TEXT NOT NULL, payload_hash BIGINT, prev_payload TEXT,
            consent VARCHAR(8) NOT NULL, state VARCHAR(20) NOT NULL, reason VARCHAR(200), request_id VARCHAR(300),
            updated_at DATETIME NOT NULL, accepted_at DATETIME, expires_at DATETIME,
            PRIMARY KEY (segment, destination, member_key));
        CREATE TABLE plan_journal (segment VARCHAR(200), destination VARCHAR(200), seq INTEGER, members INTEGER,
            body TEXT, PRIMARY KEY (segment, destination, seq));
        CREATE TABLE audiences (segment VARCHAR(200) NOT NULL, destination VARCHAR(200) NOT NULL,
            platform VARCHAR(20) NOT NULL, audience_id VARCHAR(200) NOT NULL, name VARCHAR(400) NOT NULL,
            extra TEXT NOT NULL, lookalike_id VARCHAR(200), lookalike_state VARCHAR(100), lookalike_details TEXT,
            last_replace_at DATETIME, last_status TEXT, last_status_at DATETIME, updated_at DATETIME NOT NULL,
            PRIMARY KEY (segment, destination));
    """)
    con.execute("INSERT INTO audiences VALUES ('vip', 'meta', 'meta', 'aud1', 'connector: vip', ?, NULL, NULL, NULL,"
                " NULL, NULL, NULL, '2026-11-01 00:00:00')", (json.dumps({"schema": "EMAIL,PHONE,FN,LN,FI,ZIP,COUNTRY"}),))
    for key, payload, state, prev in members:
        con.execute("INSERT INTO members VALUES ('vip', 'meta', ?, 1, ?, 0, ?, '', ?, NULL, NULL, '2026-11-01 00:00:00',"
                    " '2026-11-01 00:00:00', NULL)",
                    (member_key(key)[:32], json.dumps(payload, sort_keys=True), prev, state))  # fmt: skip
    con.commit()
    con.close()


def test_a_legacy_ledger_is_converted_and_the_next_run_sends_only_what_was_in_flight(harness: Harness) -> None:
    norm = Normalizer("meta", FIELDS, "US")
    rows = [person(i) for i in range(6)]
    payload = {r["customer_id"]: norm.normalize(r).payload for r in rows}
    gone = norm.normalize(person(99)).payload
    old_email = norm.normalize(person(5, email="old5@example.com")).payload
    legacy_ledger(harness, [
        *((f"C{i}", payload[f"C{i}"], "confirmed", None) for i in range(4)),  # on the platform
        ("C4", payload["C4"], "planned", None),  # a run died before sending it: sent again
        ("C5", payload["C5"], "confirmed", json.dumps(old_email, sort_keys=True)),  # its old payload is owed
        ("C99", gone, "remove_planned", None),  # left; its removal never went out
    ])  # fmt: skip
    meta = harness.destinations["meta"]

    meta.ensure_audience("connector: vip", None, ())  # the platform has the audience the ledger names
    aud = next(iter(meta.audiences.values()))
    meta.audiences["aud1"] = aud
    aud.audience_id = "aud1"
    del meta.audiences[next(k for k in meta.audiences if k != "aud1")]
    from connector.destinations.base import Member
    from connector.destinations.memory import payload_row

    for p in [*payload.values(), gone, old_email]:
        aud.rows.add(payload_row(Member("x", p)))
    write_csv(harness.csv, rows)
    wire = {"add": 0, "remove": 0}
    real_add, real_remove = meta.add_members, meta.remove_members

    def add(audience, members, session):  # type: ignore[no-untyped-def]
        wire["add"] += len(members)
        return real_add(audience, members, session)

    def remove(audience, members, session):  # type: ignore[no-untyped-def]
        wire["remove"] += len(members)
        return real_remove(audience, members, session)

    meta.add_members, meta.remove_members = add, remove  # type: ignore[method-assign]
    res = harness.sync(force=True)["meta"]
    assert res.status == "success", res.error
    assert res.audience_id == "aud1" and not res.audience_recreated
    assert wire == {"add": 1, "remove": 2}, wire  # C4 again; C99 and C5's old payload removed
    assert harness.audience("meta") == {payload_row(Member("x", payload[f"C{i}"])) for i in range(6)}
    con = sqlite3.connect(harness.dir / "state" / "ledger.db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "members" not in tables and con.execute("SELECT value FROM ledger_meta WHERE key = 'schema'").fetchone() == ("8",)
    con.close()
    wire.update(add=0, remove=0)
    assert harness.sync()["meta"].write_calls == 0
