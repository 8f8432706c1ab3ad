from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from connector.errors import SourceError
from connector.settings import SqlSource
from connector.sources import open_source


def test_sqlite_query_streams_batches_relative_to_config(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "shop.db")
    con.execute("CREATE TABLE c (id INTEGER, email TEXT, ltv REAL)")
    con.executemany("INSERT INTO c VALUES (?,?,?)", [(i, f"u{i}@x.com", i * 1.5) for i in range(7)])
    con.commit()
    con.close()
    src = open_source(SqlSource(type="sql", url=SecretStr("sqlite:///shop.db"), query="SELECT id, email, ltv FROM c"),
                      tmp_path)  # fmt: skip
    batches = list(src.read_batches(["id", "email"], batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert batches[0].columns["id"] == ["0", "1", "2"] and batches[2].start == 6
    with pytest.raises(SourceError, match=r"missing column\(s\) 'phone'; available: 'id', 'email', 'ltv'"):
        list(src.read_batches(["phone"]))


def test_sql_error_has_no_password(tmp_path: Path) -> None:
    (tmp_path / "x.db").touch()
    src = open_source(SqlSource(type="sql", url=SecretStr("sqlite:///x.db"), query="SELECT * FROM missing_table"),
                      tmp_path)  # fmt: skip
    with pytest.raises(SourceError, match="no such table"):
        list(src.read_batches(["a"]))
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
        batches = list(src.read_batches(["id", "email", "joined"], batch_size=10))
        assert [len(b) for b in batches] == [10, 10, 5]
        assert batches[0].columns["joined"][0] == "2024-01-02" and batches[0].columns["id"][0] == "1"
        bad = open_source(SqlSource(type="sql", url=SecretStr(url.replace("@", ":hunter2@", 1)), query="SELEC nope"),
                          Path())  # fmt: skip
        with pytest.raises(SourceError) as err:
            list(bad.read_batches(["id"]))
        assert "hunter2" not in str(err.value)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()
