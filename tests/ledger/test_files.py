"""Member files: what their statistics tell without reading them."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

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
