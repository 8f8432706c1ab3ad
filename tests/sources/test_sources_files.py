from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_source

from connector.errors import SourceError
from connector.settings import CsvSource, ParquetSource
from connector.sources import open_source, reading
from connector.sources.files import CsvFileSource, ParquetFileSource


def read_all(src, columns):  # type: ignore[no-untyped-def]
    rows = read_source(src, columns)
    return {c: rows[c] for c in columns}, rows["__row"]


def test_csv_bom_quotes_newlines_and_nulls(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes('\ufeffid,email,note\n1,"a@x.com","line\nbreak"\n2,,"q ""x"""\n007,b@x.com,\n'.encode())
    src = open_source(CsvSource(type="csv", path=Path("m.csv")), tmp_path)
    rows, _ = read_all(src, ["id", "email", "note"])
    assert rows["id"] == ["1", "2", "007"]  # ids stay strings: no lost leading zeros
    assert rows["email"] == ["a@x.com", None, "b@x.com"]
    assert rows["note"] == ["line\nbreak", 'q "x"', None]


def test_csv_delimiter_encoding_and_row_numbers(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes(b"id;name\n" + "".join(f"{i};Jos\u00e9{i}\n" for i in range(5)).encode("latin-1"))
    src = open_source(CsvSource(type="csv", path=p, delimiter=";", encoding="latin-1"), tmp_path)
    rows, numbers = read_all(src, ["name"])
    assert rows["name"][0] == "José0"
    assert numbers == [0, 1, 2, 3, 4]


def test_csv_missing_column_names_it_and_available(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("id,mail\n1,a@x.com\n")
    src = open_source(CsvSource(type="csv", path=p), tmp_path)
    with pytest.raises(SourceError, match=r"missing column\(s\) 'email'.*available: 'id', 'mail'"):
        read_source(src, ["id", "email"])


def test_csv_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        read_source(open_source(CsvSource(type="csv", path=Path("nope.csv")), tmp_path), ["a"])
    p = tmp_path / "bad.csv"
    p.write_bytes(b"id,email\n1,\xff\xfe@x.com\n")
    with pytest.raises(SourceError, match="CSV file"):
        read_source(open_source(CsvSource(type="csv", path=p), tmp_path), ["id", "email"])


def test_csv_parse_error_does_not_echo_row_content(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("id,email\n1,secret.person@example.com,extra,fields\n")
    with pytest.raises(SourceError) as err:
        read_source(open_source(CsvSource(type="csv", path=p), tmp_path), ["id", "email"])
    assert "secret.person" not in str(err.value)


def test_parquet_types_become_strings(tmp_path: Path) -> None:
    t = pa.table({"id": pa.array([1, 2, None], pa.int64()), "score": [1.0, 2.5, None], "vip": [True, False, None],
                  "email": ["a@x.com", None, "c@x.com"]})  # fmt: skip
    pq.write_table(t, tmp_path / "m.parquet")
    src = open_source(ParquetSource(type="parquet", path=Path("m.parquet")), tmp_path)
    rows, _ = read_all(src, ["id", "score", "vip", "email"])
    assert rows == {"id": ["1", "2", None], "score": ["1", "2.5", None], "vip": ["true", "false", None],
                    "email": ["a@x.com", None, "c@x.com"]}  # fmt: skip
    with pytest.raises(SourceError, match="missing column"):
        read_source(src, ["phone"])


# ----------------------------------------------------------------------------- relations


def scan(src, columns, threads: int = 2):  # type: ignore[no-untyped-def]
    """(column names, DuckDB types, rows) of the source's relation, scanned as the engine would."""
    con = duckdb.connect(config={"threads": threads})
    rel = src.relation(con, columns)
    with reading(src):
        rows = rel.order("__row").fetchall()
    return rel.columns, [str(t) for t in rel.types], rows


def csv_source(tmp_path: Path, data: bytes, **kw) -> CsvFileSource:  # type: ignore[no-untyped-def]
    (tmp_path / "m.csv").write_bytes(data)
    src = open_source(CsvSource(type="csv", path=Path("m.csv"), **kw), tmp_path)
    assert isinstance(src, CsvFileSource)
    return src


def test_csv_relation_gives_row_numbers_then_the_requested_columns_as_text(tmp_path: Path) -> None:
    src = csv_source(tmp_path, b"id,email,phone,extra\n7,a@x.com,+1 415,x\n007,b@x.com,,y\n")
    assert src.columns() == ["id", "email", "phone", "extra"]
    names, types, rows = scan(src, ["phone", "id"])
    assert names == ["__row", "phone", "id"] and types == ["BIGINT", "VARCHAR", "VARCHAR"]
    assert rows == [(0, "+1 415", "7"), (1, None, "007")]


def test_csv_empty_fields_quoted_or_not_are_null_and_spaces_are_kept(tmp_path: Path) -> None:
    """As the pyarrow reader did: "" and an empty field are both NULL; " " is a value."""
    src = csv_source(tmp_path, b'id,a,b\n1,,""\n2," ",x\n3,"",\n')
    assert scan(src, ["id", "a", "b"])[2] == [(0, "1", None, None), (1, "2", " ", "x"), (2, "3", None, None)]


def test_csv_bom_crlf_quoted_delimiters_and_newlines(tmp_path: Path) -> None:
    data = '\ufeffid;note\r\n1;"a;b"\r\n2;"line\r\nbreak"\r\n3;"q ""x"""\r\n'.encode()
    src = csv_source(tmp_path, data, delimiter=";")
    assert src.columns() == ["id", "note"]
    assert scan(src, ["id", "note"])[2] == [(0, "1", "a;b"), (1, "2", "line\r\nbreak"), (2, "3", 'q "x"')]


def test_csv_row_numbers_follow_file_order_on_a_million_rows_read_by_two_threads(tmp_path: Path) -> None:
    """Duplicate keys keep the first row, so `__row` must be the file's order even when DuckDB reads
    the file in parallel; every 1000th row has a quoted newline to make the parallel split harder."""
    n = 1_000_000
    path = tmp_path / "big.csv"
    duckdb.sql(
        f"COPY (SELECT 'C' || i AS id, CASE WHEN i % 1000 = 0 THEN 'line' || chr(10) || 'break' ELSE 'u' || i || '@x.com' END"
        f" AS email FROM range({n}) t(i) ORDER BY i) TO '{path}' (HEADER, DELIMITER ',', FORCE_QUOTE (email))"
    )
    src = open_source(CsvSource(type="csv", path=path), tmp_path)
    con = duckdb.connect(config={"threads": 2})
    rel = src.relation(con, ["email", "id"])
    with reading(src):
        got = rel.query(
            "rel",
            "SELECT count(*), count(*) FILTER (WHERE __row <> substr(id, 2)::BIGINT), "
            "count(*) FILTER (WHERE (__row % 1000 = 0) <> (email LIKE 'line%')) FROM rel",
        ).fetchall()[0]
    assert got == (n, 0, 0)


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("utf-8", "\ufeffid,name\n1,José €\n"),
        ("latin-1", "id,name\n1,José \x80\x9f\xff\n"),  # DuckDB's own latin-1 refuses 0x80-0x9f
        ("cp1252", "id,name\n1,José €\n"),
        ("utf-16", "id,name\n1,José €\n"),  # with a little-endian BOM
        ("utf-16-be", "id,name\n1,José €\n"),  # DuckDB's utf-16 reads this as an empty file
    ],
)
def test_csv_encodings(tmp_path: Path, encoding: str, data: str) -> None:
    src = csv_source(tmp_path, data.encode(encoding), encoding=encoding)
    assert src.columns() == ["id", "name"]
    assert scan(src, ["name", "id"])[2] == [(0, data.split("\n")[1].split(",")[1], "1")]


def test_csv_big_endian_utf16_with_bom_as_utf16(tmp_path: Path) -> None:
    src = csv_source(tmp_path, b"\xfe\xff" + "id\nJosé\n".encode("utf-16-be"), encoding="utf-16")
    assert scan(src, ["id"])[2] == [(0, "José")]


SECRET = "secret.person@example.com"


@pytest.mark.parametrize(
    ("data", "encoding", "message"),
    [
        (
            f"id,email\n1,a@x.com\n2,{SECRET},extra\n".encode(),
            "utf-8",
            "parse error on line 3: 3 field(s) where the header has 2",
        ),
        (f"id,email\n1,a@x.com\n{SECRET}\n".encode(), "utf-8", "parse error on line 3: 1 field(s) where the header has 2"),
        (f'id,email\n1,a@x.com\n2,"{SECRET}\n'.encode(), "utf-8", "parse error on line 3: a quoted value has no closing quote"),
        (f'id,email\n1,"{SECRET}"x\n'.encode(), "utf-8", "parse error on line 2: a quoted value has no closing quote"),
        (
            f"id,email\n1,jos\xe9{SECRET}\n".encode("latin-1"),
            "utf-8",
            "line 2: not valid utf-8 text; set the source's `encoding`",
        ),
        (f"id,email\n1,{SECRET}{'x' * (5 << 20)}\n".encode(), "utf-8", "line 2: a row is longer than 4,194,304 bytes"),
        (f"id,email\n1,{SECRET}\x81\n".encode("latin-1"), "cp1252", "not valid cp1252 text; set the source's `encoding`"),
        (
            f"id,email\n1,a@x.com\n2,{SECRET},extra\n".encode("cp1252"),
            "cp1252",
            "parse error in the first rows: CSV parse error: Expected 2 columns, got 3",
        ),
    ],
)
def test_csv_hostile_input_fails_naming_the_line_not_the_row(tmp_path: Path, data: bytes, encoding: str, message: str) -> None:
    src = csv_source(tmp_path, data, encoding=encoding)
    with pytest.raises(SourceError) as err:
        scan(src, ["id", "email"])
    assert message in str(err.value) and "m.csv" in str(err.value)
    assert "secret" not in str(err.value) and "xxxx" not in str(err.value)


def test_csv_field_of_three_megabytes_is_read(tmp_path: Path) -> None:
    src = csv_source(tmp_path, b"id,email\n1," + b"x" * (3 << 20) + b"\n2,b\n")
    rows = scan(src, ["email"])[2]
    assert [len(r[1]) for r in rows] == [3 << 20, 1]


def test_csv_relation_errors_before_reading(tmp_path: Path) -> None:
    src = csv_source(tmp_path, b"id,id,mail\n1,2,a\n")
    with pytest.raises(SourceError, match=r"missing column\(s\) 'email'; available: 'id', 'id', 'mail'"):
        src.relation(duckdb.connect(), ["mail", "email"])
    with pytest.raises(SourceError, match=r"\['id'\] appear more than once"):
        src.relation(duckdb.connect(), ["id"])
    assert scan(src, ["mail"])[2] == [(0, "a")]  # a duplicated column nobody asked for is fine
    with pytest.raises(SourceError, match="file not found"):
        open_source(CsvSource(type="csv", path=Path("nope.csv")), tmp_path).relation(duckdb.connect(), ["id"])
    with pytest.raises(SourceError, match="empty file"):
        csv_source(tmp_path, b"").relation(duckdb.connect(), ["id"])
    assert scan(csv_source(tmp_path, b"id,email\n"), ["id"])[2] == []


def test_reading_leaves_errors_that_are_not_the_sources_alone(tmp_path: Path) -> None:
    src = csv_source(tmp_path, b"id\n1\n")
    con = duckdb.connect()
    with pytest.raises(duckdb.BinderException), reading(src):
        con.sql("SELECT no_such_column FROM range(1)").fetchall()


def test_parquet_relation_turns_types_into_the_connectors_text(tmp_path: Path) -> None:
    ts = [dt.datetime(2024, 1, 2, 3, 4, 5), dt.datetime(2024, 1, 2, 3, 4, 5, 120), None]
    paris = dt.timezone(dt.timedelta(hours=1))
    t = pa.table({
        "id": pa.array([1, 2, None], pa.int64()),
        "score": [1.0, 2.5, None],
        "tiny": [1e-05, 1e20, float("nan")],
        "vip": [True, False, None],
        "email": ["a@x.com", "", None],
        "seen": pa.array(ts, pa.timestamp("us")),
        "seen_ns": pa.array(ts, pa.timestamp("ns")),
        "seen_tz": pa.array([dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=paris), None, None], pa.timestamp("ms", tz="Europe/Paris")),
        "born": pa.array([dt.date(1990, 5, 17), None, None], pa.date32()),
        "ltv": pa.array([Decimal("1.50"), Decimal("2.00"), None], pa.decimal128(10, 2)),
        "tags": pa.array([["a", "b"], None, []], pa.list_(pa.string())),
    })  # fmt: skip
    pq.write_table(t, tmp_path / "m.parquet")
    src = open_source(ParquetSource(type="parquet", path=Path("m.parquet")), tmp_path)
    assert isinstance(src, ParquetFileSource) and src.columns() == t.column_names
    names, types, rows = scan(src, t.column_names)
    assert names == ["__row", *t.column_names] and set(types) == {"BIGINT", "VARCHAR"}
    assert rows == [
        (0, "1", "1", "1e-05", "true", "a@x.com", "2024-01-02T03:04:05", "2024-01-02T03:04:05", "2024-01-02T02:04:05+00:00",
         "1990-05-17", "1.50", "[a, b]"),
        (1, "2", "2.5", "100000000000000000000", "false", "", "2024-01-02T03:04:05.000120", "2024-01-02T03:04:05.000120",
         None, None, "2.00", None),
        (2, None, None, "nan", None, None, None, None, None, None, None, "[]"),
    ]  # fmt: skip


def test_parquet_row_numbers_across_row_groups_and_errors(tmp_path: Path) -> None:
    n = 10_000
    pq.write_table(pa.table({"id": [f"C{i}" for i in range(n)], "x": list(range(n))}), tmp_path / "m.parquet",
                   row_group_size=997)  # fmt: skip
    src = open_source(ParquetSource(type="parquet", path=tmp_path / "m.parquet"), tmp_path)
    rows = scan(src, ["id"])[2]
    assert rows == [(i, f"C{i}") for i in range(n)]
    with pytest.raises(SourceError, match=r"missing column\(s\) 'email'; available: 'id', 'x'"):
        src.relation(duckdb.connect(), ["id", "email"])
    good = (tmp_path / "m.parquet").read_bytes()
    (tmp_path / "m.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        src.relation(duckdb.connect(), ["id"])
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        src.columns()
    (tmp_path / "m.parquet").unlink()
    with pytest.raises(SourceError, match="file not found"):
        src.relation(duckdb.connect(), ["id"])


def test_parquet_binary_column_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": pa.array([b"ok", b"secret\xff"], pa.binary())}), tmp_path / "m.parquet")
    src = open_source(ParquetSource(type="parquet", path=tmp_path / "m.parquet"), tmp_path)
    with pytest.raises(SourceError, match="not UTF-8 text") as err:
        scan(src, ["id"])
    assert "secret" not in str(err.value)


def test_parquet_with_a_column_named_file_row_number(tmp_path: Path) -> None:
    pq.write_table(pa.table({"file_row_number": ["a", "b"], "id": ["x", "y"]}), tmp_path / "m.parquet")
    src = open_source(ParquetSource(type="parquet", path=tmp_path / "m.parquet"), tmp_path)
    assert scan(src, ["id", "file_row_number"])[2] == [(0, "x", "a"), (1, "y", "b")]
