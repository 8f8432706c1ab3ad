"""Sending a pair's file: its batches exactly as the file numbers them, each acknowledged call one journal row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from connector.destinations.memory import InMemoryDestination
from connector.diff import PairInput, PairPlan
from connector.errors import LedgerError
from connector.ledger.files import MEMBER, ON, OWED, SENT, PairFiles, member_schema
from connector.ledger.journal import Journal, PairPointer
from connector.sending import Sender

KEYS = ("EMAIL",)
RUN = 7


def rows(start: int, n: int, kind: int, st: int, run: int | None, first_batch: int, size: int) -> pa.Table:
    """n rows with keys start.., in batches of `size` numbered from `first_batch`."""
    ks = range(start, start + n)
    return pa.Table.from_pydict({
        "k": [k.to_bytes(16, "big") for k in ks], "kind": [kind] * n, "fp": list(ks), "fq": list(ks),
        "p_EMAIL": [k.to_bytes(32, "big") for k in ks], "c": [None] * n, "v": [None] * n, "t": [None] * n,
        "st": [st] * n, "run": [run] * n, "b": [first_batch + i // size for i in range(n)], "acc": [None] * n,
    }, schema=member_schema(KEYS))  # fmt: skip


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Journal, PairFiles]:
    journal = Journal(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield journal, PairFiles(tmp_path / "members", "seg", "dest")  # type: ignore[misc]
    journal.close()


def sender(journal: Journal, files: PairFiles, dest: InMemoryDestination, size: int) -> Sender:
    inp = PairInput(name="dest", platform="meta", payload_keys=KEYS, files=files, pointer=PairPointer(), current=None,
                    journal=("", ""), run_id=RUN, batch_size=size)  # fmt: skip
    audience = dest.ensure_audience("seg", None, KEYS)
    return Sender(journal, "seg", "dest", dest, audience, PairPlan(inp), KEYS, False, lambda: None)


def test_batches_come_whole_in_the_files_order_across_the_readers_chunks(setup: tuple[Journal, PairFiles]) -> None:
    """Three removals, then 150,003 additions in batches of 10,000 that straddle the reader's 100,000-row
    chunks; rows of earlier runs and settled rows are not sent."""
    journal, files = setup
    size = 10_000
    table = pa.concat_tables([
        rows(0, 3, OWED, SENT, RUN, 0, size),
        rows(10, 150_003, MEMBER, SENT, RUN, 1, size),
        rows(200_000, 50, MEMBER, ON, None, 0, size),  # on the platform already
        rows(300_000, 20, MEMBER, SENT, RUN - 1, 0, size),  # an earlier run's
    ])  # fmt: skip
    files.write("delta.parquet", table)
    dest = InMemoryDestination("dest", "meta", max_batch_size=size)
    s = sender(journal, files, dest, size)
    got = [(b, kind, len(batch), batch.keys[0].as_py()) for b, kind, batch in s.batches(files.path("delta.parquet"))]
    assert got[0] == (0, OWED, 3, (0).to_bytes(16, "big"))
    adds = got[1:]
    assert [b for b, _, _, _ in adds] == list(range(1, 17))
    assert [n for _, _, n, _ in adds] == [size] * 15 + [3]
    assert all(kind == MEMBER for _, kind, _, _ in adds)
    assert [k for _, _, _, k in adds] == [(10 + i * size).to_bytes(16, "big") for i in range(16)]


def test_each_call_is_one_acknowledgement_and_the_audience_holds_the_adds(setup: tuple[Journal, PairFiles]) -> None:
    journal, files = setup
    files.write("base.parquet", rows(0, 25, MEMBER, SENT, RUN, 0, 10))
    dest = InMemoryDestination("dest", "meta", max_batch_size=10)
    s = sender(journal, files, dest, 10)
    s.plan.add_batches, s.plan.sends = 3, 25
    assert s.push(files.path("base.parquet")) == 3
    acks = journal.acks("seg", "dest").to_pylist()
    assert sorted((a["run"], a["b"], a["ok"]) for a in acks) == [(RUN, 0, True), (RUN, 1, True), (RUN, 2, True)]
    assert len(dest.members(s.audience.audience_id)) == 25


def test_a_file_out_of_batch_order_is_refused(setup: tuple[Journal, PairFiles]) -> None:
    journal, files = setup
    files.write("delta.parquet", pa.concat_tables([rows(0, 5, MEMBER, SENT, RUN, 1, 10), rows(5, 5, MEMBER, SENT, RUN, 0, 10)]))
    dest = InMemoryDestination("dest", "meta", max_batch_size=10)
    with pytest.raises(LedgerError, match="out of batch order"):
        list(sender(journal, files, dest, 10).batches(files.path("delta.parquet")))
