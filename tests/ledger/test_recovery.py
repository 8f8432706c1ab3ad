"""Member files resolved against the journal: what a crash leaves is read back as "maybe", nothing is lost."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from connector.ledger.files import (
    GONE,
    MAYBE,
    MEMBER,
    ON,
    OWED,
    REJECTED,
    REPLACED,
    SENT,
    TO_SEND,
    PairFiles,
    member_schema,
    replaces_by_position,
)
from connector.ledger.journal import BatchAck, Journal, PairPointer
from connector.ledger.recovery import (
    STATES,
    compact,
    current_sql,
    read_pair,
    register_journal,
    resolved_sql,
    state_counts,
    state_histogram,
)

KEYS = ("EMAIL",)


def row(k: int, kind: int, st: int, run: int | None = None, b: int | None = None, email: bytes | None = None) -> dict[str, object]:
    return {"k": k.to_bytes(16, "big"), "kind": kind, "fp": k, "p_EMAIL": email or bytes([k]) * 32, "c": None,
            "st": st, "run": run, "b": b, "acc": None}  # fmt: skip


def write(files: PairFiles, name: str, rows: list[dict[str, object]]) -> None:
    schema = member_schema(KEYS)
    files.write(name, pa.Table.from_pylist(rows, schema=schema))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Journal, PairFiles]:
    journal = Journal(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield journal, PairFiles(tmp_path / "members", "seg", "dest")  # type: ignore[misc]
    journal.close()


def states(journal: Journal, files: PairFiles, pointer: PairPointer) -> dict[tuple[int, int], int]:
    con = duckdb.connect()
    cur = current_sql(files, pointer, member_schema(KEYS))
    assert cur is not None
    acks, rej = register_journal(con, journal, "seg", "dest", "t")
    rows = con.sql(f"SELECT k, kind, st FROM ({resolved_sql(cur, acks, rej)})").fetchall()
    return {(int.from_bytes(k, "big"), kind): st for k, kind, st in rows}


def test_a_sent_row_is_on_the_platform_only_once_its_batch_was_acknowledged(setup: tuple[Journal, PairFiles]) -> None:
    journal, files = setup
    # run 7 sent removals in batches 0 and 1, then adds in batches 2..5
    write(files, "base.parquet", [row(5, OWED, SENT, 7, 0), row(6, OWED, SENT, 7, 1), row(1, MEMBER, SENT, 7, 2),
                                  row(2, MEMBER, SENT, 7, 3), row(3, MEMBER, SENT, 7, 4), row(4, MEMBER, SENT, 7, 5),
                                  row(8, MEMBER, ON)])  # fmt: skip
    p = journal.move_pair("seg", "dest", PairPointer(), "base.parquet", None, 7)
    journal.ack_batch("seg", "dest", BatchAck(7, 0, "remove", 1))
    journal.ack_batch("seg", "dest", BatchAck(7, 2, "add", 1, rejected={(1).to_bytes(16, "big").hex(): "bad"}))
    journal.ack_batch("seg", "dest", BatchAck(7, 3, "add", 1, "req", "pending"))
    journal.ack_batch("seg", "dest", BatchAck(7, 4, "add", 1, "req2", "pending"))
    journal.resolve_request("seg", "dest", "req2", False, "FAILED", {})
    # batches 1 and 5 were never acknowledged: the run died with them in flight
    got = states(journal, files, p)
    assert got[(5, OWED)] == ON  # removal acknowledged: done
    assert got[(6, OWED)] == TO_SEND  # removal not acknowledged: owed still
    assert got[(1, MEMBER)] == REJECTED  # the platform refused it in an acknowledged call
    assert got[(2, MEMBER)] == ON  # acknowledged, Google confirms later: counted as accepted
    assert got[(3, MEMBER)] == MAYBE  # its request failed: sent again
    assert got[(4, MEMBER)] == MAYBE  # unacknowledged: maybe on the platform
    assert got[(8, MEMBER)] == ON


def test_a_delta_replaces_all_of_a_keys_rows_and_gone_keys_vanish(setup: tuple[Journal, PairFiles]) -> None:
    journal, files = setup
    write(files, "base.parquet", [row(1, MEMBER, ON), row(2, MEMBER, ON), row(2, OWED, TO_SEND), row(3, MEMBER, ON)])
    write(files, "delta.parquet", [row(2, MEMBER, ON, email=b"\x09" * 32), {**row(3, GONE, ON), "p_EMAIL": None}])
    p = journal.move_pair("seg", "dest", PairPointer(), "base.parquet", "delta.parquet", 1)
    got = states(journal, files, p)
    assert got == {(1, MEMBER): ON, (2, MEMBER): ON}  # key 2's owed row went with the delta; key 3 is gone


def test_a_delta_that_lists_the_base_rows_it_replaces_drops_those_rows(setup: tuple[Journal, PairFiles]) -> None:
    """A delta names the base rows it replaces by row number (and -1: the list is there); an older delta
    without the list replaces by key (the test above). Key 2's rows are base rows 1 and 2, key 3's row 3."""
    journal, files = setup
    write(files, "base.parquet", [row(1, MEMBER, ON), row(2, MEMBER, ON), row(2, OWED, TO_SEND), row(3, MEMBER, ON)])
    replaced = [{"k": None, "kind": REPLACED, "b": pos} for pos in (-1, 1, 2, 3)]
    write(files, "delta.parquet", [row(2, MEMBER, ON, email=b"\x09" * 32), {**row(3, GONE, ON), "p_EMAIL": None}, *replaced])
    assert replaces_by_position(files.path("delta.parquet"))
    p = journal.move_pair("seg", "dest", PairPointer(), "base.parquet", "delta.parquet", 1)
    assert states(journal, files, p) == {(1, MEMBER): ON, (2, MEMBER): ON}
    # by row number, not by key: a list that names only row 3 keeps key 2's base rows beside its delta row
    write(files, "delta2.parquet", [row(2, MEMBER, ON, email=b"\x09" * 32), {**row(3, GONE, ON), "p_EMAIL": None},
                                    *replaced[:1], {"k": None, "kind": REPLACED, "b": 3}])  # fmt: skip
    p = journal.move_pair("seg", "dest", p, "base.parquet", "delta2.parquet", 1)
    con = duckdb.connect()
    cur = current_sql(files, p, member_schema(KEYS))
    assert cur is not None
    rows = sorted(con.sql(f"SELECT k, kind FROM ({cur})").fetchall())
    assert rows == sorted([(k.to_bytes(16, "big"), kind) for k, kind in ((1, MEMBER), (2, MEMBER), (2, OWED), (2, MEMBER))])


def test_compaction_writes_settled_states_and_keeps_what_google_has_not_confirmed(setup: tuple[Journal, PairFiles]) -> None:
    journal, files = setup
    write(files, "base.parquet", [row(1, MEMBER, SENT, 2, 0), row(2, MEMBER, SENT, 2, 1), row(3, MEMBER, SENT, 2, 2),
                                  row(4, OWED, SENT, 2, 0)])  # fmt: skip
    p = journal.move_pair("seg", "dest", PairPointer(), "base.parquet", None, 2)
    journal.ack_batch("seg", "dest", BatchAck(2, 0, "add", 2))
    journal.ack_batch("seg", "dest", BatchAck(2, 1, "add", 1, "req", "pending"))
    con = duckdb.connect()
    acks, rej = register_journal(con, journal, "seg", "dest", "c")
    cur = current_sql(files, p, member_schema(KEYS))
    assert cur is not None
    compact(con, files, p, KEYS, resolved_sql(cur, acks, rej), "base2.parquet")
    p2 = journal.move_pair("seg", "dest", p, "base2.parquet", None, 2)
    journal.forget_batches("seg", "dest", 2)
    raw = {(int.from_bytes(r["k"], "big"), r["kind"]): (r["st"], r["run"], r["b"])
           for r in pa.parquet.read_table(files.path("base2.parquet")).to_pylist()}  # fmt: skip
    assert raw[(1, MEMBER)][0] == ON and raw[(2, MEMBER)] == (SENT, 2, 1) and raw[(3, MEMBER)] == (MAYBE, 2, None)
    assert (4, OWED) not in raw  # its removal was acknowledged
    assert states(journal, files, p2) == {(1, MEMBER): ON, (2, MEMBER): ON, (3, MEMBER): MAYBE}
    journal.resolve_request("seg", "dest", "req", False, "FAILED", {})
    assert states(journal, files, p2)[(2, MEMBER)] == MAYBE  # a late FAILED still sends it again


def test_counts_and_the_audit_reader(setup: tuple[Journal, PairFiles], tmp_path: Path) -> None:
    journal, files = setup
    write(files, "base.parquet", [row(1, MEMBER, ON), row(2, MEMBER, REJECTED), row(3, MEMBER, SENT, 4, 0),
                                  row(4, OWED, TO_SEND)])  # fmt: skip
    p = journal.move_pair("seg", "dest", PairPointer(), "base.parquet", None, 4)
    con = duckdb.connect()
    acks, rej = register_journal(con, journal, "seg", "dest", "n")
    cur = current_sql(files, p, member_schema(KEYS))
    assert cur is not None
    assert state_counts(con, resolved_sql(cur, acks, rej)) == {"confirmed": 1, "rejected": 1, "planned": 1}
    assert dict(zip(STATES, state_histogram(con, resolved_sql(cur, acks, rej)), strict=True)) == {
        "confirmed": 1, "accepted": 0, "rejected": 1, "planned": 1}  # fmt: skip
    rows = read_pair(journal, tmp_path / "members", "seg", "dest", KEYS).to_pylist()
    assert {r["EMAIL"] for r in rows} == {(bytes([i]) * 32).hex() for i in (1, 2, 3, 4)}


def test_a_file_is_whole_or_absent(tmp_path: Path) -> None:
    files = PairFiles(tmp_path, "seg", "dest")
    w = files.writer("x.parquet", member_schema(KEYS))
    w.write(pa.Table.from_pylist([row(1, MEMBER, ON)], schema=member_schema(KEYS)))
    assert not files.path("x.parquet").exists()  # nothing under its name until it is complete and synced
    w.seal()  # finished and synced in the background: still not under its name, and it may yet be dropped
    assert not files.path("x.parquet").exists()
    w.abort()
    assert not files.path("x.parquet").exists() and not any(files.dir.iterdir())
    sealed = files.writer("s.parquet", member_schema(KEYS))
    sealed.write(pa.Table.from_pylist([row(2, MEMBER, ON)], schema=member_schema(KEYS)))
    sealed.seal()
    sealed.close()
    assert pa.parquet.read_table(files.path("s.parquet")).column("k").to_pylist() == [(2).to_bytes(16, "big")]
    files.path("s.parquet").unlink()
    with files.writer("y.parquet", member_schema(KEYS)) as w2:
        w2.write(pa.Table.from_pylist([row(1, MEMBER, ON)], schema=member_schema(KEYS)))
    assert pa.parquet.read_table(files.path("y.parquet")).num_rows == 1
    (files.dir / "stale.parquet").write_bytes(b"x")
    (files.dir / "z.parquet.tmp").write_bytes(b"x")
    assert files.collect(["y.parquet"]) == 2 and sorted(os.listdir(files.dir)) == ["y.parquet"]


def test_a_file_written_before_a_field_was_added_reads_it_as_null(setup: tuple[Journal, PairFiles]) -> None:
    journal, files = setup
    write(files, "base.parquet", [row(1, MEMBER, ON)])
    p = journal.move_pair("seg", "dest", PairPointer(), "base.parquet", None, 1)
    cur = current_sql(files, p, member_schema(("EMAIL", "PHONE")))
    assert cur is not None
    assert duckdb.sql(f"SELECT p_PHONE FROM ({cur})").fetchall() == [(None,)]


def test_acceptance_time_comes_from_the_acknowledgement(setup: tuple[Journal, PairFiles]) -> None:
    journal, files = setup
    write(files, "base.parquet", [row(1, MEMBER, SENT, 3, 0)])
    p = journal.move_pair("seg", "dest", PairPointer(), "base.parquet", None, 3)
    before = datetime.now(UTC)
    journal.ack_batch("seg", "dest", BatchAck(3, 0, "add", 1))
    con = duckdb.connect()
    acks, rej = register_journal(con, journal, "seg", "dest", "a")
    cur = current_sql(files, p, member_schema(KEYS))
    assert cur is not None
    ((acc,),) = con.sql(f"SELECT acc FROM ({resolved_sql(cur, acks, rej)})").fetchall()
    assert acc is not None and abs((acc - before).total_seconds()) < 60
