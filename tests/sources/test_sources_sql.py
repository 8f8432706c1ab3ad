from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import duckdb
import pytest
from conftest import read_source
from pydantic import SecretStr

from connector.errors import SourceError
from connector.settings import SqlSource
from connector.sources import open_source, reading
from connector.sources.sql import SqlQuerySource


def test_sqlite_query_streams_batches_relative_to_config(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "shop.db")
    con.execute("CREATE TABLE c (id INTEGER, email TEXT, ltv REAL)")
    con.executemany("INSERT INTO c VALUES (?,?,?)", [(i, f"u{i}@x.com", i * 1.5) for i in range(7)])
    con.commit()
    con.close()
    src = open_source(SqlSource(type="sql", url=SecretStr("sqlite:///shop.db"), query="SELECT id, email, ltv FROM c"),
                      tmp_path)  # fmt: skip
    rows = read_source(src, ["id", "email"])
    assert rows["id"] == [str(i) for i in range(7)] and rows["__row"] == list(range(7))
    with pytest.raises(SourceError, match=r"missing column\(s\) 'phone'; available: 'id', 'email', 'ltv'"):
        read_source(src, ["phone"])


def test_sql_error_has_no_password(tmp_path: Path) -> None:
    (tmp_path / "x.db").touch()
    src = open_source(SqlSource(type="sql", url=SecretStr("sqlite:///x.db"), query="SELECT * FROM missing_table"),
                      tmp_path)  # fmt: skip
    with pytest.raises(SourceError, match="no such table"):
        read_source(src, ["a"])
    with pytest.raises(SourceError, match="not found"):
        open_source(SqlSource(type="sql", url=SecretStr("sqlite:///nope.db"), query="SELECT 1"), tmp_path)


def test_postgres_query() -> None:
    url = os.environ.get("CONNECTOR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CONNECTOR_TEST_POSTGRES_URL not set: PostgreSQL source test skipped")
    from sqlalchemy import create_engine, text

    table = f"members_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id bigint, email text, joined date)"))
        conn.execute(text(f"INSERT INTO {table} SELECT g, 'u' || g || '@x.com', DATE '2024-01-02' FROM generate_series(1, 25) g"))
    try:
        src = open_source(SqlSource(type="sql", url=SecretStr(url), query=f"SELECT * FROM {table} ORDER BY id"), Path())
        rows = read_source(src, ["id", "email", "joined"])
        assert rows["__row"] == list(range(25)) and rows["id"] == [str(i) for i in range(1, 26)]
        assert rows["joined"][0] == "2024-01-02"
        bad = open_source(SqlSource(type="sql", url=SecretStr(url.replace("@", ":hunter2@", 1)), query="SELEC nope"),
                          Path())  # fmt: skip
        with pytest.raises(SourceError) as err:
            read_source(bad, ["id"])
        assert "hunter2" not in str(err.value)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


# ----------------------------------------------------------------------------- relations


def scan(src, columns):  # type: ignore[no-untyped-def]
    con = duckdb.connect(config={"threads": 2})
    rel = src.relation(con, columns)
    with reading(src):
        rows = rel.order("__row").fetchall()
    return rel.columns, [str(t) for t in rel.types], rows


def test_sqlite_relation_text_of_every_storage_class_and_query_order(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "shop.db")
    con.execute("CREATE TABLE c (id INTEGER, email TEXT, ltv REAL, mixed, pic BLOB)")
    rows = [(i, f"u{i}@x.com", i * 1.5, i if i % 3 else f"t{i}", b"ab") for i in range(3000)]
    rows.append((3000, "", 2.0, 2.5, None))  # a float after thousands of ints and texts: SQLite allows it
    con.executemany("INSERT INTO c VALUES (?,?,?,?,?)", rows)
    con.commit()
    con.close()
    src = open_source(SqlSource(type="sql", url=SecretStr("sqlite:///shop.db"), batch_size=1000,
                                query="SELECT * FROM c ORDER BY id DESC"), tmp_path)  # fmt: skip
    assert isinstance(src, SqlQuerySource) and not src.uses_adbc
    assert src.columns() == ["id", "email", "ltv", "mixed", "pic"]
    names, types, got = scan(src, ["mixed", "id", "ltv", "email", "pic"])
    assert names == ["__row", "mixed", "id", "ltv", "email", "pic"] and types == ["BIGINT"] + ["VARCHAR"] * 5
    assert got[0] == (0, "2.5", "3000", "2", "", None)
    assert got[1:4] == [(1, "2999", "2999", "4498.5", "u2999@x.com", "ab"), (2, "2998", "2998", "4497", "u2998@x.com", "ab"),
                        (3, "t2997", "2997", "4495.5", "u2997@x.com", "ab")]  # fmt: skip
    assert [r[0] for r in got] == list(range(3001)) and [r[2] for r in got] == [str(i) for i in range(3000, -1, -1)]


def test_sqlite_relation_errors(tmp_path: Path) -> None:
    (tmp_path / "x.db").touch()
    src = open_source(SqlSource(type="sql", url=SecretStr("sqlite:///x.db"), query="SELECT * FROM missing_table"), tmp_path)
    with pytest.raises(SourceError, match=r"query failed: .*no such table: missing_table"):
        src.relation(duckdb.connect(), ["a"])
    with pytest.raises(SourceError, match="no such table"):
        src.columns()
    ok = open_source(SqlSource(type="sql", url=SecretStr("sqlite:///x.db"), query="SELECT 1 AS a, 2 AS b"), tmp_path)
    with pytest.raises(SourceError, match=r"missing column\(s\) 'c'; available: 'a', 'b'"):
        ok.relation(duckdb.connect(), ["a", "c"])


def test_postgres_relation_through_adbc() -> None:
    url = os.environ.get("CONNECTOR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CONNECTOR_TEST_POSTGRES_URL not set: PostgreSQL source test skipped")
    from sqlalchemy import create_engine, text

    table = f"members_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id bigint, email text, ltv numeric(10, 2), score float8, vip bool, "
                          "seen timestamptz, at timestamp, joined date, ref uuid, doc jsonb, pic bytea, ip inet)"))  # fmt: skip
        conn.execute(text(f"INSERT INTO {table} SELECT g, CASE WHEN g = 2 THEN '' WHEN g = 3 THEN NULL ELSE 'u' || g || '@x.com' END, "
                          "CASE WHEN g = 1 THEN 1.50 ELSE 3 END, g, g % 2 = 0, TIMESTAMPTZ '2024-01-02 03:04:05+02', "
                          "TIMESTAMP '2024-01-02 03:04:05.5', DATE '2024-01-02', '6f1c0b7e-3c7b-4a61-9d8e-3f5b1c2d4e5f', "
                          "'{\"a\": 1}', 'ab', '10.0.0.1' FROM generate_series(1, 2500) g"))  # fmt: skip
    try:
        cols = ["id", "email", "ltv", "score", "vip", "seen", "at", "joined", "ref", "doc", "pic"]
        src = open_source(SqlSource(type="sql", url=SecretStr(url), query=f"SELECT * FROM {table} ORDER BY id DESC"), Path())
        assert isinstance(src, SqlQuerySource) and src.uses_adbc
        assert src.columns() == [*cols, "ip"]
        names, types, got = scan(src, cols)
        assert names == ["__row", *cols] and types == ["BIGINT"] + ["VARCHAR"] * len(cols)
        assert [r[1] for r in got] == [str(g) for g in range(2500, 0, -1)] and [r[0] for r in got] == list(range(2500))
        assert got[-1][1:] == ("1", "u1@x.com", "1.50", "1", "false", "2024-01-02T01:04:05+00:00", "2024-01-02T03:04:05.500000",
                               "2024-01-02", "6f1c0b7e-3c7b-4a61-9d8e-3f5b1c2d4e5f", '{"a": 1}', "ab")  # fmt: skip
        assert got[-2][1:6] == ("2", "", "3", "2", "true") and got[-3][2] is None
        with pytest.raises(SourceError, match=r"column 'ip' has a database type \(inet\).*ip::text"):
            src.relation(duckdb.connect(), ["ip"])
        with pytest.raises(SourceError, match=r"missing column\(s\) 'phone'; available: 'id'"):
            src.relation(duckdb.connect(), ["phone"])
        bad = open_source(SqlSource(type="sql", url=SecretStr(url.replace("@", ":hunter2@", 1)), query="SELEC nope"), Path())
        with pytest.raises(SourceError, match="syntax error") as err:
            bad.relation(duckdb.connect(), ["id"])
        assert "hunter2" not in str(err.value)
        down = open_source(SqlSource(type="sql", url=SecretStr("postgresql+psycopg://shop:hunter2@127.0.0.1:1/nope"),
                                     query="SELECT 1"), Path())  # fmt: skip
        with pytest.raises(SourceError, match="query failed") as err:
            down.relation(duckdb.connect(), ["id"])
        assert "hunter2" not in str(err.value)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()
