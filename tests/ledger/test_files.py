"""Member files: what their statistics tell without reading them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from connector.ledger import files
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
    assert files._sync_file_range is not None
    flushing = files._Writeback(path)
    flushing.start()
    flushing.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert files._sync_file_range(fd, 0, 0, files._SYNC_FILE_RANGE_WRITE) == 0
        assert files._sync_file_range(-1, 0, 0, files._SYNC_FILE_RANGE_WRITE) == -1  # an error is reported, not lost
    finally:
        os.close(fd)
