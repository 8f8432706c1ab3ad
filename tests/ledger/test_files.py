"""Member files: how they are written, and what their statistics tell without reading them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connector.errors import LedgerError
from connector.ledger import files as member_files
from connector.ledger.files import MEMBER, ON, OWED, TO_SEND, PairFiles, member_schema, members_fingerprinted

KEYS = ("EMAIL",)


def write(files: PairFiles, name: str, rows: list[tuple[int, int, int | None]]) -> Path:
    """Rows of (key, kind, fingerprint) as a member file."""
    table = pa.Table.from_pylist([
        {"k": k.to_bytes(16, "big"), "kind": kind, "fp": fp, "fq": fp, "p_EMAIL": bytes([k]) * 32,
         "st": ON if kind == MEMBER else TO_SEND}
        for k, kind, fp in rows
    ], schema=member_schema(KEYS))  # fmt: skip
    files.write(name, table)
    return files.path(name)


def test_members_without_a_whole_fingerprint_are_told_apart_from_owed_rows(tmp_path: Path) -> None:
    """Only members need a fingerprint: an owed removal has none, and a file of members whose statistics show
    no missing fingerprint is not read at all."""
    files = PairFiles(tmp_path, "seg", "dest")
    whole = write(files, "whole.parquet", [(1, MEMBER, 11), (2, MEMBER, 12)])
    owed = write(files, "owed.parquet", [(1, MEMBER, 11), (2, OWED, None)])
    converted = write(files, "converted.parquet", [(1, MEMBER, 11), (2, MEMBER, None)])
    con = duckdb.connect()
    statements: list[str] = []

    class Counting:
        def execute(self, sql: str) -> duckdb.DuckDBPyConnection:
            statements.append(sql)
            return con.execute(sql)

    counting = Counting()
    assert members_fingerprinted(counting, [whole])  # type: ignore[arg-type]
    assert statements == []
    assert members_fingerprinted(counting, [whole, owed])  # type: ignore[arg-type]
    assert len(statements) == 1
    assert not members_fingerprinted(con, [whole, converted])
    assert not members_fingerprinted(con, [owed, converted])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_a_member_file_being_written_has_its_disk_writes_started(tmp_path: Path) -> None:
    """The writer starts the disk writes of what it wrote so far (so the closing fsync has little left):
    the call is bound and the kernel takes it."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1_000_000)
    assert member_files._sync_file_range is not None
    flushing = member_files._Writeback(path)
    flushing.start()
    flushing.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert member_files._sync_file_range(fd, 0, 0, member_files._SYNC_FILE_RANGE_WRITE) == 0
        assert member_files._sync_file_range(-1, 0, 0, member_files._SYNC_FILE_RANGE_WRITE) == -1  # an error is reported, not lost
    finally:
        os.close(fd)


def test_keys_and_digests_are_written_fixed_width_and_read_back_as_they_were(tmp_path: Path) -> None:
    """Keys and digests go to the file as fixed-width columns (one copy of their bytes to read back), from
    whole or sliced batches, with or without missing digests; a reader gets the same binary values."""
    pair = PairFiles(tmp_path, "seg", "dest")
    rows = [{"k": i.to_bytes(16, "big"), "kind": MEMBER, "fp": i, "fq": i, "p_EMAIL": bytes([i]) * 32 if i % 3 else None,
             "st": ON} for i in range(10)]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=member_schema(KEYS))
    with pair.writer("f.parquet", table.schema) as w:
        whole = table.combine_chunks().to_batches()[0]
        w.write(whole.slice(0, 4))
        w.write(whole.slice(4, 2))  # at an offset into its buffers, no digest missing: its bytes as they are
        w.write(whole.slice(6))  # at an offset, digests missing
        w.write(pa.Table.from_pylist([rows[1]] * 3, schema=member_schema(KEYS)))  # no missing digest: bytes as they are
    pair.publish("f.parquet")
    stored = pq.ParquetFile(pair.path("f.parquet"))
    assert stored.schema_arrow.field("k").type == pa.binary(16)
    assert stored.schema_arrow.field("p_EMAIL").type == pa.binary(32)
    back = pa.Table.from_batches([member_files.as_read(rb) for rb in stored.iter_batches(batch_size=3)])
    want = pa.concat_tables([table, pa.Table.from_pylist([rows[1]] * 3, schema=member_schema(KEYS))])
    assert back.schema == member_schema(KEYS)
    assert back.to_pylist() == want.to_pylist()
    con = duckdb.connect()
    assert con.sql(f"SELECT typeof(k), typeof(p_EMAIL) FROM read_parquet('{pair.path('f.parquet')}') LIMIT 1").fetchall() == [
        ("BLOB", "BLOB")
    ]


def test_a_digest_of_another_width_is_an_error_naming_its_column(tmp_path: Path) -> None:
    pair = PairFiles(tmp_path, "seg", "dest")
    bad = pa.Table.from_pylist([{"k": bytes(16), "kind": MEMBER, "p_EMAIL": bytes(31), "st": ON}], schema=member_schema(KEYS))
    with pytest.raises(LedgerError, match="'p_EMAIL': a value is not 32 bytes"):
        with pair.writer("bad.parquet", bad.schema) as w:
            w.write(bad)
    assert not list(tmp_path.rglob("bad.parquet*"))
