"""The ledger contract, run against every store: SQLite (always) and PostgreSQL (when
CONNECTOR_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import Harness, person, write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

import connector.ledger.store as store_module
from connector.engine import Engine, SyncOptions
from connector.ledger.store import LedgerIndex, SqlLedger, StagedMember


def _urls() -> list[object]:
    pg = os.environ.get("CONNECTOR_TEST_POSTGRES_URL")
    return [
        "sqlite",
        pytest.param(
            pg or "postgres",
            marks=pytest.mark.skipif(not pg, reason="CONNECTOR_TEST_POSTGRES_URL not set: PostgreSQL ledger skipped"),
        ),
    ]


@pytest.fixture(params=_urls())
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlLedger]:
    url = request.param
    store = SqlLedger(f"sqlite:///{tmp_path / 'l.db'}" if url == "sqlite" else str(url))
    yield store
    store.close()


def seg() -> str:
    return f"seg-{uuid.uuid4().hex[:8]}"  # PostgreSQL is shared between runs: unique names


def staged(i: int, payload: str | None = None, fp: int | None = None) -> StagedMember:
    return StagedMember(f"{i:032x}", fp if fp is not None else i, payload or f'{{"EMAIL":"{i:064x}"}}', "GG")


def test_plan_push_commit_cycle(ledger: SqlLedger) -> None:
    s = seg()
    ledger.apply_plan(s, "d", iter([[staged(i) for i in range(5)]]), iter([]))
    assert ledger.pending_counts(s, "d") == (0, 5)
    (batch,) = list(ledger.iter_additions(s, "d", 10))
    ledger.commit_additions(s, "d", [p.key for p in batch[:4]], state="confirmed", request_id="r1",
                            rejected={batch[4].key: "bad"}, deferred={}, ttl_days=None)  # fmt: skip
    assert ledger.counts(s, "d") == {"confirmed": 4, "rejected": 1}
    index = ledger.load_index(s, "d")
    assert len(index) == 5 and int(index.on_platform.sum()) == 4 and bool(index.stable.all())
    # unsigned 64-bit fingerprints survive the signed BIGINT column
    ledger.apply_plan(s, "d", iter([[staged(7, fp=(1 << 64) - 1)]]), iter([]))
    index = ledger.load_index(s, "d")
    assert (1 << 64) - 1 in [int(x) for x in index.fingerprints]


def test_identifier_change_keeps_old_payload_until_removed(ledger: SqlLedger) -> None:
    s = seg()
    ledger.apply_plan(s, "d", iter([[staged(1, '{"EMAIL":"old"}')]]), iter([]))
    ledger.commit_additions(s, "d", [f"{1:032x}"], state="confirmed", request_id=None, rejected={}, deferred={},
                            ttl_days=None)  # fmt: skip
    ledger.apply_plan(s, "d", iter([[staged(1, '{"EMAIL":"new"}', fp=99)]]), iter([]))
    (removals,) = list(ledger.iter_removals(s, "d", 10))
    assert [r.payload for r in removals] == ['{"EMAIL":"old"}']
    assert list(ledger.iter_additions(s, "d", 10)) == []  # add waits for the removal
    ledger.commit_removals(s, "d", [removals[0].key])
    (adds,) = list(ledger.iter_additions(s, "d", 10))
    assert [a.payload for a in adds] == ['{"EMAIL":"new"}']


def test_removal_and_runs(ledger: SqlLedger) -> None:
    s = seg()
    ledger.apply_plan(s, "d", iter([[staged(1), staged(2)]]), iter([]))
    ledger.commit_additions(s, "d", [f"{1:032x}", f"{2:032x}"], state="accepted", request_id="req",
                            rejected={}, deferred={}, ttl_days=30)  # fmt: skip
    assert ledger.pending_requests(s, "d") == ["req"]
    ledger.resolve_request(s, "d", "req", "confirmed", None, {})
    ledger.apply_plan(s, "d", iter([]), iter([[f"{2:032x}"]]))
    (rem,) = list(ledger.iter_removals(s, "d", 10))
    ledger.commit_removals(s, "d", [r.key for r in rem])
    assert ledger.counts(s, "d") == {"confirmed": 1}
    rid = ledger.start_run("manual", s, "d", False)
    ledger.finish_run(rid, "success", {"adds": 2}, None)
    runs = [r for r in ledger.list_runs(100) if r.segment == s]
    assert runs[0].status == "success" and runs[0].counts == {"adds": 2}
    assert ledger.last_success(s, "d") is not None


def test_payloads_a_killed_run_may_have_sent_are_removed_when_the_member_changes_or_leaves(ledger: SqlLedger) -> None:
    """A run plans P1 and dies after sending it (nothing recorded); the member changes to P2, the next
    run dies the same way; then it changes to P3. P1 and P2 may both be on the platform: both are
    removed before P3 is added. When it then leaves, P3 is removed with whatever is still owed."""
    s = seg()
    p1, p2, p3 = (f'{{"EMAIL":"{c * 64}"}}' for c in "123")
    ledger.apply_plan(s, "d", iter([[staged(1, p1)]]), iter([]))
    ledger.apply_plan(s, "d", iter([[staged(1, p2, fp=2)]]), iter([]))
    ledger.apply_plan(s, "d", iter([[staged(1, p3, fp=3)]]), iter([]))
    removals = [m.payload for batch in ledger.iter_removals(s, "d", 10) for m in batch]
    assert sorted(removals) == [p1, p2]
    assert list(ledger.iter_additions(s, "d", 10)) == []  # the add waits for the removals
    ledger.apply_plan(s, "d", iter([]), iter([[f"{1:032x}"]]))  # the member left before anything was acked
    removals = [m.payload for batch in ledger.iter_removals(s, "d", 10) for m in batch]
    assert sorted(removals) == [p1, p2, p3]
    ledger.commit_removals(s, "d", [f"{1:032x}"])
    assert list(ledger.iter_removals(s, "d", 10)) == [] and ledger.pending_counts(s, "d") == (0, 0)


def test_removal_batches_keep_a_members_payloads_together_and_never_exceed_the_limit(ledger: SqlLedger) -> None:
    s = seg()
    for version in range(3):  # three interrupted changes: two payloads owed per member
        ledger.apply_plan(s, "d", iter([[staged(i, f'{{"EMAIL":"{i * 10 + version:064x}"}}', fp=version)
                                         for i in range(7)]]), iter([]))  # fmt: skip
    batches = [[(m.key, m.payload) for m in b] for b in ledger.iter_removals(s, "d", 3)]
    assert all(len(b) <= 3 for b in batches)
    assert sum(len(b) for b in batches) == 14
    for b in batches:  # a member's owed payloads never straddle two batches
        assert all(sum(k == key for k, _ in b) == 2 for key, _ in b)


def test_a_plan_interrupted_while_written_is_completed_by_the_next_run(
    ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plans are committed in parts: what a crash leaves is re-planned, and nothing sent is forgotten."""
    from connector.ledger import store as store_module

    monkeypatch.setattr(store_module, "_PLAN_COMMIT_ROWS", 5)
    s = seg()
    ledger.apply_plan(s, "d", iter([[staged(i, f'{{"EMAIL":"p{i}"}}') for i in range(10)]]), iter([]))
    ledger.commit_additions(s, "d", [f"{i:032x}" for i in range(10)], state="confirmed", request_id=None,
                            rejected={}, deferred={}, ttl_days=None)  # fmt: skip
    changed = [StagedMember(f"{i:032x}", 100 + i, f'{{"EMAIL":"q{i}"}}', "GG") for i in range(5)]
    new = [StagedMember(f"{i:032x}", i, f'{{"EMAIL":"p{i}"}}', "GG", known=False) for i in range(10, 15)]

    def crashing() -> Iterator[list[StagedMember]]:
        yield changed
        yield new
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ledger.apply_plan(s, "d", crashing(), iter([[f"{9:032x}"]]))
    # the first part was committed, the second and the removal were not
    assert ledger.counts(s, "d") == {"confirmed": 5, "planned": 5}
    assert ledger.pending_counts(s, "d") == (5, 5)
    # the next run plans everything again (the changed members are no longer "new" to it)
    ledger.apply_plan(s, "d", iter([changed, new]), iter([[f"{9:032x}"]]))
    removed = sorted(p.payload for b in ledger.iter_removals(s, "d", 100) for p in b)
    assert removed == [f'{{"EMAIL":"p{i}"}}' for i in (0, 1, 2, 3, 4, 9)]
    ledger.commit_removals(s, "d", [f"{i:032x}" for i in (0, 1, 2, 3, 4, 9)])
    added = sorted(p.payload for b in ledger.iter_additions(s, "d", 100) for p in b)
    assert added == sorted([f'{{"EMAIL":"q{i}"}}' for i in range(5)] + [f'{{"EMAIL":"p{i}"}}' for i in range(10, 15)])


def fresh(i: int) -> StagedMember:
    return StagedMember(f"{i:032x}", (1 << 64) - 1 - i, f'{{"EMAIL":"{i:064x}"}}', "GU", known=False)


def test_new_members_wait_in_the_journal_and_are_written_once_in_their_final_state(ledger: SqlLedger) -> None:
    s = seg()
    ledger.apply_plan(s, "d", iter([[staged(i) for i in range(3)]]), iter([]))  # 3 planned in `members`
    ledger.apply_plan(s, "d", iter([[fresh(i) for i in range(10, 14)], [fresh(i) for i in range(14, 17)]]), iter([]),
                      journal=True)  # fmt: skip
    with ledger.engine.connect() as conn:  # the new members have no row yet: only the journal's two parts
        assert conn.exec_driver_sql(f"SELECT count(*) FROM members WHERE segment = '{s}'").scalar() == 3
    assert ledger.counts(s, "d") == {"planned": 10}
    assert ledger.pending_counts(s, "d") == (0, 10)
    batches = list(ledger.iter_additions(s, "d", 4))
    # journal first (across its parts), then the ledger's planned members, batches filled across both
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [p.key for p in batches[1]] == [f"{i:032x}" for i in range(14, 17)] + [f"{0:032x}"]
    assert [p.fresh is not None for p in batches[1]] == [True, True, True, False]
    assert batches[0][-1].fresh == (1, (1 << 64) - 1 - 13, True) and batches[0][0].fresh == (1, (1 << 64) - 11, False)
    for b in batches:
        rejected = {b[0].key: "bad email"} if b is batches[0] else {}
        deferred = {b[1].key: "later"} if b is batches[1] else {}
        ledger.commit_additions(s, "d", [p.key for p in b], state="accepted", request_id="r", rejected=rejected,
                                deferred=deferred, ttl_days=30, fresh=[p for p in b if p.fresh])  # fmt: skip
    assert ledger.counts(s, "d") == {"accepted": 8, "rejected": 1, "deferred": 1}
    assert ledger.rejected_reasons(s, "d") == {"bad email": 1}
    assert ledger.pending_counts(s, "d") == (0, 1)
    assert [p.key for b in ledger.iter_additions(s, "d", 10) for p in b] == [f"{15:032x}"]  # deferred: next run
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT count(*) FROM plan_journal WHERE segment = '{s}'").scalar() == 0
        row = conn.exec_driver_sql(
            f"SELECT fingerprint, consent, request_id, accepted_at, expires_at FROM members "
            f"WHERE segment = '{s}' AND member_key = '{11:032x}'"
        ).one()
    assert row[1:3] == ("GU", "r") and row[3] is not None and row[4] is not None
    index = ledger.load_index(s, "d")
    assert len(index) == 10 and int(index.on_platform.sum()) == 8
    # the unsigned fingerprint came through the journal intact: the member is unchanged to the next plan
    pos = int(np.searchsorted(index.keys, bytes.fromhex(f"{11:032x}")))
    assert int(index.fingerprints[pos]) == (1 << 64) - 1 - 11


def test_many_members_written_many_a_statement_keep_every_value_in_its_row(ledger: SqlLedger) -> None:
    # 1,000 rows: several full statements of `insert_rows` and a shorter last one (planned rows: 9 values
    # each, 111 a statement; rows inserted in their final state: 13 values each, 76 a statement)
    s = seg()
    ledger.apply_plan(s, "d", iter([[staged(i, fp=i * 7) for i in range(1000)]]), iter([]))
    ledger.apply_plan(s, "d", iter([[fresh(i) for i in range(1000, 2000)]]), iter([]), journal=True)
    (batch,) = list(ledger.iter_additions(s, "d", 5000))
    ledger.commit_additions(s, "d", [p.key for p in batch], state="confirmed", request_id=None, rejected={},
                            deferred={}, ttl_days=None, fresh=[p for p in batch if p.fresh])  # fmt: skip
    with ledger.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT member_key, fingerprint, payload, consent, state FROM members WHERE segment = '{s}' "
            "ORDER BY member_key"
        ).all()
    assert len(rows) == 2000
    for i, (key, fp, payload, consent, state) in enumerate(rows):
        assert key == f"{i:032x}" and payload == f'{{"EMAIL":"{i:064x}"}}' and state == "confirmed"
        # fingerprints are stored signed (64-bit)
        assert fp % (1 << 64) == (i * 7 if i < 1000 else (1 << 64) - 1 - i)
        assert consent == ("GG" if i < 1000 else "GU")


@pytest.mark.parametrize("journal", [True, False])
def test_new_members_given_column_wise_are_planned_as_staged_ones_are(ledger: SqlLedger, journal: bool) -> None:
    by_object, by_column = seg(), seg()
    members = [fresh(i) for i in range(250)]
    ledger.apply_plan(by_object, "d", iter([members[:100], members[100:]]), iter([]), journal=journal)
    columns = [([m.key for m in part], [m.fingerprint for m in part], [m.payload for m in part],
                [m.consent for m in part]) for part in (members[:100], members[100:])]  # fmt: skip
    ledger.apply_plan(by_column, "d", iter([]), iter([]), journal=journal, new=columns)
    for s in (by_object, by_column):
        assert ledger.counts(s, "d") == {"planned": 250}
        assert ledger.pending_counts(s, "d") == (0, 250)
    batches = [list(ledger.iter_additions(s, "d", 60)) for s in (by_object, by_column)]
    assert [[(p.key, p.payload, p.consent, p.fresh) for p in b] for b in batches[0]] == [
        [(p.key, p.payload, p.consent, p.fresh) for p in b] for b in batches[1]
    ]
    assert all((p.fresh is not None) == journal for b in batches[1] for p in b)
    for s, sent in zip((by_object, by_column), batches, strict=True):
        for b in sent:
            ledger.commit_additions(s, "d", [p.key for p in b], state="confirmed", request_id=None, rejected={},
                                    deferred={}, ttl_days=None, fresh=[p for p in b if p.fresh])  # fmt: skip
    a, b = ledger.load_index(by_object, "d"), ledger.load_index(by_column, "d")
    assert a.same_as(b) and len(b) == 250 and int(b.on_platform.sum()) == 250


def test_insert_rows_sends_many_rows_a_statement_within_sqlites_parameter_limit() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (a, b, c)")
    sent: list[int] = []

    def execute(sql: str, params: Sequence[object]) -> object:
        assert len(params) <= 999 and sql.count("?") == len(params)
        sent.append(len(params) // 3)
        return db.execute(sql, params)

    rows = [(i, None if i % 5 == 0 else f"v{i}", i * 0.5) for i in range(1000)]
    store_module.insert_rows(execute, "INSERT INTO t", rows)
    assert sent == [333, 333, 333, 1]
    assert db.execute("SELECT a, b, c FROM t ORDER BY rowid").fetchall() == rows
    store_module.insert_rows(execute, "INSERT INTO t", [])
    assert len(sent) == 4


def test_a_journal_left_by_a_dead_run_is_planned_by_the_next(ledger: SqlLedger) -> None:
    """A run died while pushing a part of its journal in smaller batches: what it committed stays, the
    rest (maybe sent, maybe not) becomes `planned`, so it is sent again, or removed if it left."""
    s = seg()
    ledger.apply_plan(s, "d", iter([[fresh(i) for i in range(6)], [fresh(i) for i in range(6, 9)]]), iter([]),
                      journal=True)  # fmt: skip
    first = next(ledger.iter_additions(s, "d", 4))
    ledger.commit_additions(s, "d", [p.key for p in first], state="confirmed", request_id=None, rejected={},
                            deferred={}, ttl_days=None, fresh=first)  # fmt: skip
    # ... and the process died here, after sending (or not) the next batch
    assert ledger.counts(s, "d") == {"confirmed": 4, "planned": 5}
    assert ledger.recover_journal(s, "d") == 5
    assert ledger.recover_journal(s, "d") == 0
    assert ledger.counts(s, "d") == {"confirmed": 4, "planned": 5}
    with ledger.engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT count(*) FROM plan_journal WHERE segment = '{s}'").scalar() == 0
    pending = [p for b in ledger.iter_additions(s, "d", 10) for p in b]
    assert [p.key for p in pending] == [f"{i:032x}" for i in range(4, 9)] and not any(p.fresh for p in pending)
    # one of them left the segment: its payload, perhaps sent by the dead run, is removed
    ledger.apply_plan(s, "d", iter([]), iter([[f"{8:032x}"]]))
    assert [p.payload for b in ledger.iter_removals(s, "d", 10) for p in b] == [f'{{"EMAIL":"{8:064x}"}}']


def test_a_schema_1_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    """Schema 1 -> 7: payload_hash filled, the indexes of owed removals and expiry, pair versions; no
    payload_hash index (schema 2 to 4 had one); the plan journal."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = SqlLedger(url)
    store.apply_plan("s", "d", iter([[staged(i) for i in range(3)]]), iter([]))
    store.close()
    with sqlite3.connect(tmp_path / "old.db") as conn:  # what schema 1 looked like
        conn.execute("DROP INDEX ix_members_owed")
        conn.execute("DROP INDEX ix_members_expires")
        conn.execute("ALTER TABLE members DROP COLUMN payload_hash")
        conn.execute("DROP TABLE pair_versions")
        conn.execute("DROP TABLE plan_journal")
        conn.execute("DELETE FROM ledger_meta WHERE key = 'ledger_id'")
        conn.execute("UPDATE ledger_meta SET value = '1' WHERE key = 'schema'")
    store = SqlLedger(url)
    try:
        payloads = [m.payload for b in store.iter_additions("s", "d", 10) for m in b]
        assert len(payloads) == 3
        assert store._held_by_others("s", "d", set(payloads)) == set()
        store.commit_additions("s", "d", [f"{i:032x}" for i in range(3)], state="confirmed", request_id=None,
                               rejected={}, deferred={}, ttl_days=None)  # fmt: skip
        assert store._held_by_others("s", "d", set(payloads)) == set(payloads)  # found through the filled hashes
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema'").fetchone() == ("7",)
        assert conn.execute("SELECT count(*) FROM plan_journal").fetchone() == (0,)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"ix_members_owed", "ix_members_expires"} <= indexes and "ix_members_payload" not in indexes
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'ix_members_expires'").fetchone()
        assert "WHERE expires_at IS NOT NULL" in sql, sql
        assert conn.execute("SELECT version FROM pair_versions WHERE segment = 's'").fetchone() == (1,)


def test_a_schema_4_ledger_loses_its_payload_index_and_keeps_only_unsettled_and_expiring_members_in_those_indexes(
    tmp_path: Path,
) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'v4.db'}"
    store = SqlLedger(url)
    store.apply_plan("s", "d", iter([[staged(i) for i in range(4)]]), iter([]))
    store.commit_additions("s", "d", [f"{i:032x}" for i in range(2)], state="confirmed", request_id=None,
                           rejected={}, deferred={}, ttl_days=30)  # fmt: skip
    store.close()
    with sqlite3.connect(tmp_path / "v4.db") as conn:  # what schema 4 had
        conn.execute("CREATE INDEX ix_members_payload ON members (segment, destination, payload_hash)")
        conn.execute("DROP INDEX ix_members_expires")
        conn.execute("CREATE INDEX ix_members_expires ON members (segment, destination, expires_at)")
        conn.execute("DROP INDEX ix_members_state")
        conn.execute("CREATE INDEX ix_members_state ON members (segment, destination, state, member_key)")
        conn.execute("UPDATE ledger_meta SET value = '4' WHERE key = 'schema'")
    SqlLedger(url).close()
    with sqlite3.connect(tmp_path / "v4.db") as conn:
        assert conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema'").fetchone() == ("7",)
        assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'ix_members_payload'").fetchall()
        # partial indexes: only the two members with an expiry; schema 7: only the two not confirmed
        for name, condition in (("ix_members_expires", "expires_at IS NOT NULL"),
                                ("ix_members_state", "state != 'confirmed'")):  # fmt: skip
            (sql,) = conn.execute(f"SELECT sql FROM sqlite_master WHERE name = '{name}'").fetchone()
            assert f"WHERE {condition}" in sql, sql
            where = f"segment = 's' AND destination = 'd' AND {condition}"
            assert conn.execute(f"SELECT count(*) FROM members INDEXED BY {name} WHERE {where}").fetchone() == (2,)


def test_pending_work_and_the_index_never_scan_the_audience(tmp_path: Path) -> None:
    """Every query a sync with few changes makes is an index search (SQLite's planner once walked the
    whole audience for owed removals, pending adds and expiring memberships)."""
    from datetime import timedelta

    from sqlalchemy import event

    from connector.ledger.store import now

    store = SqlLedger(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        store.apply_plan("s", "d", iter([[staged(i) for i in range(50)]]), iter([]))
        keys = [f"{i:032x}" for i in range(50)]
        store.commit_additions("s", "d", keys[:40], state="confirmed", request_id=None, rejected={}, deferred={},
                               ttl_days=30)  # fmt: skip
        store.apply_plan("s", "d", iter([[staged(1, '{"EMAIL":"changed"}')]]), iter([keys[2:4]]))
        statements: list[tuple[str, object]] = []

        def record(conn: object, cursor: object, statement: str, params: object, context: object, many: bool) -> None:
            if statement.lstrip().upper().startswith(("SELECT", "UPDATE")) and not many:
                statements.append((statement, params))

        index = store.load_index("s", "d")  # a sync has its pairs' indexes (it read them to plan)
        event.listen(store.engine, "before_cursor_execute", record)
        assert store.pending_counts("s", "d") == (3, 11)
        assert sum(len(b) for b in store.iter_removals("s", "d", 10, index)) == 3
        assert sum(len(b) for b in store.iter_additions("s", "d", 10)) == 10
        assert sum(len(b) for b in store.iter_present("s", "d", 100)) == 48
        assert store.mark_for_resend("s", "d", now() + timedelta(days=1)) == 0
        event.remove(store.engine, "before_cursor_execute", record)
        assert len(statements) >= 8
        # walking the pair: a scan, or a search bound by nothing but the pair (the partial index of owed
        # removals holds only those; the plan journal holds only the parts of a plan not yet pushed)
        walk = re.compile(r"SCAN members|SEARCH members USING .*INDEX (?!ix_members_owed)\w+ \(segment=\? AND destination=\?\)$")
        with store.engine.connect() as conn:
            for sql, params in statements:
                plan = [r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]  # type: ignore[arg-type]
                assert not any(walk.search(p) for p in plan), (sql, plan)
                if "prev_payload IS NOT NULL" in sql:
                    assert any("ix_members_owed" in p for p in plan), (sql, plan)
    finally:
        store.close()


# ----------------------------------------------------------------------------- index snapshots
# The whole suite runs with CONNECTOR_CHECK_INDEX_SNAPSHOTS=1 (conftest): every snapshot any test uses
# or writes is also compared with the ledger itself. These tests check when snapshots are used.


def keys(ids: range | list[int]) -> list[str]:
    return [f"{i:032x}" for i in ids]


def confirm(store: SqlLedger, s: str, ids: range | list[int], **kw: object) -> None:
    store.apply_plan(s, "d", iter([[staged(i) for i in ids]]), iter([]))
    args: dict[str, object] = {"state": "confirmed", "request_id": None, "rejected": {}, "deferred": {},
                               "ttl_days": None, **kw}  # fmt: skip
    store.commit_additions(s, "d", keys(ids), **args)  # type: ignore[arg-type]


def synced(url: str, tmp_path: Path, s: str, n: int, **kw: object) -> SqlLedger:
    """A ledger with snapshots after one run that confirmed members 0..n-1 of pair (s, d)."""
    store = SqlLedger(url, index_dir=tmp_path / "index")
    store.open_index(s, "d")
    assert len(store.load_index(s, "d")) == 0
    confirm(store, s, range(n), **kw)
    store.save_index(s, "d")
    return store


def truth(store: SqlLedger, s: str) -> LedgerIndex:
    plain = SqlLedger(store.url)  # no snapshots: read from the database
    try:
        return plain.load_index(s, "d")
    finally:
        plain.close()


def test_members_a_run_inserts_go_into_its_snapshot_without_being_read_back(
    ledger: SqlLedger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # more changed members than this and the whole pair is read again (a cold run's new members
    # used to be: 3 s of a 42 s cold run of 300k members); fewer are read back by key
    monkeypatch.setattr(store_module, "_PATCH_MAX_KEYS", 10)
    s = seg()
    a = SqlLedger(ledger.url, index_dir=tmp_path / "index")
    a.open_index(s, "d")
    assert len(a.load_index(s, "d")) == 0 and a.index_reads == 1
    a.apply_plan(s, "d", iter([[fresh(i) for i in range(40)]]), iter([]), journal=True)
    for b in a.iter_additions(s, "d", 15):
        sent = [p.key for p in b]
        a.commit_additions(s, "d", sent, state="accepted", request_id="r1",
                           rejected={k: "bad" for k in sent if k == keys([0])[0]},
                           deferred={k: "later" for k in sent if k == keys([20])[0]}, ttl_days=None,
                           fresh=[p for p in b if p.fresh])  # fmt: skip
    # changed again after it was inserted: read back, and what was read wins over what was inserted
    a.resolve_request(s, "d", "r1", "confirmed", None, {keys([7])[0]: "bad phone"})
    a.save_index(s, "d")
    assert a.index_reads == 1
    b = SqlLedger(ledger.url, index_dir=tmp_path / "index")  # the next run reads the snapshot
    b.open_index(s, "d")
    idx = b.load_index(s, "d")
    assert b.index_reads == 0 and idx.same_as(truth(b, s)) and len(idx) == 40
    assert int(idx.on_platform.sum()) == 37 and int(idx.stable.sum()) == 39  # 0, 7 rejected; 20 deferred
    assert not bool(idx.stable[20]) and bool(idx.stable[7]) and not bool(idx.on_platform[7])
    a.close()
    b.close()


def test_a_run_patches_its_changes_into_the_snapshot_and_the_next_process_reads_it(
    ledger: SqlLedger,
    tmp_path: Path,
) -> None:
    s = seg()
    a = synced(ledger.url, tmp_path, s, 40, rejected={keys([3])[0]: "bad"})
    assert a.index_reads == 1  # the empty pair; then 40 changed members read back by key and patched in

    b = SqlLedger(ledger.url, index_dir=tmp_path / "index")  # the next run, another process
    b.open_index(s, "d")
    idx = b.load_index(s, "d")
    assert b.index_reads == 0 and idx.same_as(truth(b, s))
    assert int(idx.on_platform.sum()) == 39 and int(idx.stable.sum()) == 40
    b.apply_plan(s, "d", iter([[staged(i, fp=1000 + i) for i in range(40, 45)]]), iter([keys(range(5))]))
    b.commit_removals(s, "d", keys(range(5)))
    b.save_index(s, "d")
    assert b.index_reads == 0

    a.open_index(s, "d")
    idx = a.load_index(s, "d")
    assert a.index_reads == 1 and idx.same_as(truth(a, s))
    assert len(idx) == 40 and int(idx.on_platform.sum()) == 35  # 0-4 removed (3 was rejected), 40-44 planned
    a.close()
    b.close()


def test_a_change_made_without_following_the_pair_makes_the_snapshot_stale(
    ledger: SqlLedger,
    tmp_path: Path,
) -> None:
    s = seg()
    a = synced(ledger.url, tmp_path, s, 20)
    # another process (no snapshot directory of its own) changes the pair
    other = SqlLedger(ledger.url)
    other.apply_plan(s, "d", iter([]), iter([keys([7])]))
    other.commit_removals(s, "d", keys([7]))
    other.resolve_request(s, "d", "r1", "planned", "failed", {keys([8])[0]: "bad"})
    other.close()
    reads = a.index_reads
    idx = a.load_index(s, "d")
    assert a.index_reads == reads + 1 and idx.same_as(truth(a, s)) and len(idx) == 19
    a.close()


def test_a_rolled_back_change_does_not_hide_another_processs_change(ledger: SqlLedger, tmp_path: Path) -> None:
    """A transaction that bumped the version and then rolled back, plus one change by another process,
    would add up to the version the run expects: the run must not patch, but read the pair again."""
    s = seg()
    a = synced(ledger.url, tmp_path, s, 10)
    a.open_index(s, "d")
    a.load_index(s, "d")
    clash = StagedMember(keys([3])[0], 3, '{"EMAIL":"x"}', "GG", known=False)  # already there: insert fails
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        a.apply_plan(s, "d", iter([[staged(100)], [clash]]), iter([]))
    other = SqlLedger(ledger.url)
    other.apply_plan(s, "d", iter([]), iter([keys([7])]))  # one transaction, one version
    other.close()
    reads = a.index_reads
    idx = a.load_index(s, "d")
    assert a.index_reads == reads + 1 and idx.same_as(truth(a, s)) and not bool(idx.on_platform[7])
    a.close()


def test_a_damaged_snapshot_is_ignored(ledger: SqlLedger, tmp_path: Path) -> None:
    s = seg()
    a = synced(ledger.url, tmp_path, s, 10)
    (snapshot,) = (tmp_path / "index").glob("*.npz")
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # a crash mid-write on a filesystem without rename
    reads = a.index_reads
    idx = a.load_index(s, "d")
    assert a.index_reads == reads + 1 and len(idx) == 10 and idx.same_as(truth(a, s))
    a.close()


def test_a_snapshot_written_before_payload_hashes_is_read_again(ledger: SqlLedger, tmp_path: Path) -> None:
    s = seg()
    a = synced(ledger.url, tmp_path, s, 10)
    (snapshot,) = (tmp_path / "index").glob("*.npz")
    with np.load(snapshot) as z:
        old = {k: z[k] for k in ("version", "keys", "fingerprints", "codes")}  # schema 4's snapshot
    with snapshot.open("wb") as f:
        np.savez(f, **old)
    reads = a.index_reads
    idx = a.load_index(s, "d")
    assert a.index_reads == reads + 1 and idx.same_as(truth(a, s)) and bool(idx.payload_hashes.all())
    a.close()


def test_a_warm_sync_reads_no_index_from_the_database(harness: Harness) -> None:
    rows = [person(i) for i in range(30)]
    harness.sync(rows)
    changed = [person(5, email="new5@example.com") if r["customer_id"] == "C5" else r for r in rows[2:]]
    write_csv(harness.csv, [*changed, person(30)])
    settings_ = harness.settings
    store = SqlLedger(settings_.ledger_sqlalchemy_url(), index_dir=settings_.index_path)
    with Engine(settings_, ledger=store, destination_factory=harness.factory) as engine:
        res = {r.destination: r for r in engine.sync(None, SyncOptions(force=True))}
    assert store.index_reads == 0
    c = res["meta"].counts
    assert (c.removes, c.adds, c.changes) == (2, 1, 1)
    store.close()


def _keys_from(ints: list[int]) -> np.ndarray:  # type: ignore[type-arg]
    # 16-byte keys; small ints share their first 8 bytes (all zero), and many end in NUL bytes
    return np.array([i.to_bytes(16, "big") for i in ints], dtype="S16")


key_ints = st.one_of(st.integers(0, 2**16), st.integers(0, 2**128 - 1), st.integers(0, 255).map(lambda i: i << 64))


@settings(max_examples=200, deadline=None)
@given(
    base=st.lists(key_ints, unique=True, max_size=40),
    dirty=st.lists(key_ints, unique=True, max_size=20),
    data=st.data(),
)
def test_a_patched_index_is_the_index_built_from_scratch(base: list[int], dirty: list[int], data: st.DataObject) -> None:
    codes = {k: data.draw(st.integers(0, 2)) for k in base}
    fps = {k: data.draw(st.integers(0, 2**64 - 1)) for k in base}
    phs = {k: data.draw(st.integers(-(2**63), 2**63 - 1)) for k in base}
    base.sort()
    index = LedgerIndex.from_codes(
        _keys_from(base), np.array([fps[k] for k in base], dtype=np.uint64),
        np.array([codes[k] for k in base], dtype=np.uint8), np.array([phs[k] for k in base], dtype=np.int64),
    )  # fmt: skip
    # each dirty key is now gone, or there with a new fingerprint, state and payload
    now = {
        k: (data.draw(st.integers(0, 2**64 - 1)), data.draw(st.integers(0, 2)), data.draw(st.integers(-5, 5)))
        for k in dirty if data.draw(st.booleans())
    }  # fmt: skip
    rows = list(now)  # in no particular order
    patched = index.patched(
        _keys_from(dirty), _keys_from(rows), np.array([now[k][0] for k in rows], dtype=np.uint64),
        np.array([now[k][1] for k in rows], dtype=np.uint8), np.array([now[k][2] for k in rows], dtype=np.int64),
    )  # fmt: skip
    final = {k: (fps[k], codes[k], phs[k]) for k in base if k not in dirty} | now
    order = sorted(final)
    expected = LedgerIndex.from_codes(
        _keys_from(order), np.array([final[k][0] for k in order], dtype=np.uint64),
        np.array([final[k][1] for k in order], dtype=np.uint8), np.array([final[k][2] for k in order], dtype=np.int64),
    )  # fmt: skip
    assert patched.same_as(expected)
    # members by payload hash, found through the patched index (small hashes: some shared)
    wanted = {data.draw(st.integers(-5, 5)) for _ in range(3)}
    found = patched.keys[patched.holding(wanted)].tolist()
    assert found == [k for k in expected.keys.tolist() if final[int.from_bytes(k.ljust(16, b"\0"), "big")][2] in wanted]
    assert all(bool(f) for f in patched.lookup(_keys_from(order))[1]) if order else True
