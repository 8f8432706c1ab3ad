"""The control plane: pair pointers (compare-and-swap), acknowledged batches, rejections, runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from connector.errors import LedgerError
from connector.ledger.journal import BatchAck, Journal, PairPointer


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    j = Journal(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield j  # type: ignore[misc]
    j.close()


def test_a_pointer_move_commits_synced_in_full_and_acknowledgements_do_not(journal: Journal) -> None:
    """SQLite at synchronous=NORMAL loses the last commits to a power cut: the pointer move (the write-ahead
    point) is written at FULL; the many acknowledgements stay at NORMAL (one lost only has its batch sent
    again), and the connection goes back to NORMAL after a move, failed or not."""
    seen: list[tuple[str, int]] = []

    @event.listens_for(journal.engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split()
        if words[0] in ("INSERT", "UPDATE") and words[1 + (words[0] == "INSERT")] in ("pairs", "batches"):
            seen.append((words[1 + (words[0] == "INSERT")], cursor.connection.execute("PRAGMA synchronous").fetchone()[0]))

    first = journal.move_pair("s", "d", PairPointer(), "base-1.parquet", None, 1)
    journal.ack_batch("s", "d", BatchAck(1, 0, "add", 10, None))
    with pytest.raises(LedgerError):
        journal.move_pair("s", "d", PairPointer(), "base-2.parquet", None, 2)
    journal.move_pair("s", "d", first, "base-1.parquet", "delta-2.parquet", 2)
    journal.ack_batch("s", "d", BatchAck(2, 0, "add", 10, None))
    full, normal = 2, 1
    assert seen == [("pairs", full), ("batches", normal), ("pairs", full), ("pairs", full), ("batches", normal)]


def test_a_pair_pointer_moves_only_from_the_version_it_was_read_at(journal: Journal) -> None:
    assert journal.pointer("s", "d") == PairPointer()
    first = journal.move_pair("s", "d", PairPointer(), "base-1.parquet", None, 1)
    assert journal.pointer("s", "d") == first == PairPointer(1, "base-1.parquet", None, 1)
    second = journal.move_pair("s", "d", first, "base-1.parquet", "delta-2.parquet", 2)
    assert second.version == 2
    with pytest.raises(LedgerError, match="another process"):
        journal.move_pair("s", "d", first, "base-1.parquet", "delta-3.parquet", 3)  # stale: read before `second`
    with pytest.raises(LedgerError, match="another process"):
        journal.move_pair("s", "d", PairPointer(), "base-9.parquet", None, 9)  # a second first write
    assert journal.pointer("s", "d") == second


def test_acknowledged_batches_and_what_the_platform_refused(journal: Journal) -> None:
    journal.ack_batch("s", "d", BatchAck(1, 0, "add", 3, "req-1", "pending", rejected={"aa" * 16: "invalid entry"}))
    journal.ack_batch("s", "d", BatchAck(1, 1, "remove", 2, None, deferred={"bb" * 16: "audience too small"}))
    acks = journal.acks("s", "d").to_pylist()
    assert [(a["run"], a["b"], a["ok"], a["pending"]) for a in acks] == [(1, 0, True, True), (1, 1, True, False)]
    rej = journal.rejections("s", "d").to_pylist()
    assert {(r["k"].hex(), r["deferred"]) for r in rej} == {("aa" * 16, False), ("bb" * 16, True)}
    assert journal.rejected_reasons("s", "d") == {"invalid entry": 1}  # deferred ones are sent again, not rejected
    assert journal.pending_requests("s", "d") == ["req-1"]
    journal.resolve_request("s", "d", "req-1", False, "INTERNAL", {"cc" * 16: "bad hash"})
    assert journal.pending_requests("s", "d") == []
    assert [a["ok"] for a in journal.acks("s", "d").to_pylist()] == [False, True]  # failed: its members go again
    assert journal.rejected_reasons("s", "d") == {"invalid entry": 1, "bad hash": 1}


def test_forgetting_a_pair_drops_its_batches_and_rejections_only(journal: Journal) -> None:
    p = journal.move_pair("s", "d", PairPointer(), "b.parquet", None, 1)
    journal.ack_batch("s", "d", BatchAck(1, 0, "add", 1, rejected={"aa" * 16: "x"}))
    journal.ack_batch("s", "other", BatchAck(2, 0, "add", 1))
    journal.move_pair("s", "d", p, None, None, None, forget=True)
    assert journal.acks("s", "d").num_rows == 0 and journal.rejections("s", "d").num_rows == 0
    assert journal.acks("s", "other").num_rows == 1


def test_compaction_forgets_settled_batches_but_keeps_pending_ones(journal: Journal) -> None:
    journal.ack_batch("s", "d", BatchAck(1, 0, "add", 1, "r1", "pending"))
    journal.ack_batch("s", "d", BatchAck(1, 1, "add", 1, "r1", "ok"))
    journal.ack_batch("s", "d", BatchAck(2, 0, "add", 1, None, "ok"))
    journal.forget_batches("s", "d", 1)
    assert sorted((a["run"], a["b"]) for a in journal.acks("s", "d").to_pylist()) == [(1, 0), (2, 0)]


def test_runs_are_listed_newest_first_with_their_counts(journal: Journal) -> None:
    a = journal.start_run("manual", "s", "d", dry_run=False)
    b = journal.start_run("schedule", "s", "d", dry_run=True)
    journal.finish_run(a, "success", {"adds": 3}, None)
    journal.finish_run(b, "failed", {}, "boom")
    runs = journal.list_runs()
    assert [(r.id, r.status, r.dry_run) for r in runs] == [(b, "failed", True), (a, "success", False)]
    assert runs[1].counts == {"adds": 3} and runs[0].error == "boom"
    assert journal.last_success("s", "d") is not None and journal.last_success("s", "x") is None
