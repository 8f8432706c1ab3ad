from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connector.errors import SourceError
from connector.settings import CsvSource, ParquetSource
from connector.sources import open_source


def read_all(src, columns, batch_size=50_000):  # type: ignore[no-untyped-def]
    rows: dict[str, list[str | None]] = {c: [] for c in columns}
    starts = []
    for b in src.read_batches(columns, batch_size=batch_size):
        starts.append(b.start)
        for c in columns:
            rows[c].extend(b.columns[c])
    return rows, starts


def test_csv_bom_quotes_newlines_and_nulls(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes('\ufeffid,email,note\n1,"a@x.com","line\nbreak"\n2,,"q ""x"""\n007,b@x.com,\n'.encode())
    src = open_source(CsvSource(type="csv", path=Path("m.csv")), tmp_path)
    rows, _ = read_all(src, ["id", "email", "note"])
    assert rows["id"] == ["1", "2", "007"]  # ids stay strings: no lost leading zeros
    assert rows["email"] == ["a@x.com", None, "b@x.com"]
    assert rows["note"] == ["line\nbreak", 'q "x"', None]


def test_csv_delimiter_encoding_and_batches(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes(b"id;name\n" + "".join(f"{i};Jos\u00e9{i}\n" for i in range(5)).encode("latin-1"))
    src = open_source(CsvSource(type="csv", path=p, delimiter=";", encoding="latin-1"), tmp_path)
    rows, starts = read_all(src, ["name"], batch_size=2)
    assert rows["name"][0] == "José0"
    assert starts == [0, 2, 4]


def test_csv_missing_column_names_it_and_available(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("id,mail\n1,a@x.com\n")
    src = open_source(CsvSource(type="csv", path=p), tmp_path)
    with pytest.raises(SourceError, match=r"missing column\(s\) 'email'.*available: 'id', 'mail'"):
        list(src.read_batches(["id", "email"]))


def test_csv_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        list(open_source(CsvSource(type="csv", path=Path("nope.csv")), tmp_path).read_batches(["a"]))
    p = tmp_path / "bad.csv"
    p.write_bytes(b"id,email\n1,\xff\xfe@x.com\n")
    with pytest.raises(SourceError, match="CSV file"):
        list(open_source(CsvSource(type="csv", path=p), tmp_path).read_batches(["id", "email"]))


def test_csv_parse_error_does_not_echo_row_content(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("id,email\n1,secret.person@example.com,extra,fields\n")
    with pytest.raises(SourceError) as err:
        list(open_source(CsvSource(type="csv", path=p), tmp_path).read_batches(["id", "email"]))
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
        list(src.read_batches(["phone"]))
