"""CSV and Parquet sources, read by DuckDB directly.

CSV: every column is text; an empty field, quoted or not, is NULL; a UTF-8 byte order mark is not
part of the first column's name; quoted fields may hold delimiters, doubled quotes and newlines; a
row with more or fewer fields than the header, an unterminated quote, bytes that are not valid in the
configured encoding or a row longer than `MAX_ROW_BYTES` stop the read with the line number (never
the row). UTF-8 files are parsed by DuckDB's parallel reader; other encodings (latin-1, cp1252,
UTF-16, ...) are transcoded by pyarrow's streaming CSV reader (DuckDB's own latin-1 refuses bytes
0x80-0x9f and it reads big-endian UTF-16 as an empty file) and handed to DuckDB as Arrow batches.

Parquet: DuckDB's `read_parquet`; ``__row`` is the file row number; non-text columns become the text
`as_text` gives them (1.0 -> "1", true -> "true", timestamps ISO 8601).
"""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from connector.errors import SourceError
from connector.settings import CsvSource, ParquetSource
from connector.sources.base import (
    ROW,
    ArrowStream,
    as_text,
    check_columns,
    ident,
    literal,
    row_number,
)

MAX_ROW_BYTES = 4 << 20  # DuckDB's reader refuses longer rows (its default, 2,000,000, is below real exports' worst)

# pyarrow quotes the offending row in some parse errors: keep only the part before it (PII).
_ROW_QUOTE = re.compile(r"(:\s*(got|Expected)[^:]*?)(:.*)$", re.S)
_CSV_LINE = re.compile(r"CSV Error on Line: (\d+)")
_FIELD_COUNT = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")
_NATIVE = ("utf-8", "utf-8-sig")
_ESCAPED = re.compile("[\udc80-\udcff]")


def _safe_arrow_message(exc: BaseException) -> str:
    msg = str(exc).split("\n", 1)[0]
    msg = _ROW_QUOTE.sub(r"\1", msg)
    return msg[:300]


def _encoding_name(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise SourceError(f"CSV source: unknown encoding {encoding!r}; set the source's `encoding`") from None


class CsvFileSource:
    def __init__(self, config: CsvSource, base_dir: Path) -> None:
        self.config = config
        self.path = config.path if config.path.is_absolute() else base_dir / config.path
        self.description = f"CSV file {self.path}"
        self._stream = ArrowStream(self.description)

    def _header(self) -> list[str]:
        enc = _encoding_name(self.config.encoding)
        if enc == "utf-8":
            enc = "utf-8-sig"  # a UTF-8 BOM is not part of the first column's name
        # undecodable bytes are kept as lone surrogates: only the header's own bytes must decode here
        bad = f"{self.description}: header is not valid {self.config.encoding}; set the source's `encoding`"
        try:
            with self.path.open(newline="", encoding=enc, errors="surrogateescape") as f:
                row = next(csv.reader(f, delimiter=self.config.delimiter), None)
        except FileNotFoundError:
            raise SourceError(f"{self.description}: file not found") from None
        except UnicodeError:
            raise SourceError(bad) from None
        except csv.Error as exc:
            raise SourceError(f"{self.description}: header row unreadable ({str(exc)[:100]})") from None
        except OSError as exc:
            raise SourceError(f"{self.description}: cannot read ({exc.strerror})") from None
        if row and any(_ESCAPED.search(c) for c in row):
            raise SourceError(bad)
        if not row:
            raise SourceError(f"{self.description}: empty file (no header row)")
        return [c.strip() for c in row]

    def columns(self) -> list[str]:
        return self._header()

    def _native(self) -> bool:
        # DuckDB expands glob characters in paths: such a file goes through the pyarrow reader
        return _encoding_name(self.config.encoding) in _NATIVE and not any(ch in str(self.path) for ch in "*?[{")

    def relation(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        header = self._header()
        check_columns(self.description, columns, header)
        dupes = {c for c in header if header.count(c) > 1} & set(columns)
        if dupes:
            raise SourceError(f"{self.description}: column(s) {sorted(dupes)} appear more than once in the header")
        if not self._native():
            return self._transcoded(con, columns)
        # columns get positional names: the header was read above (stripped, duplicates allowed)
        spec = "{" + ", ".join(f"'c{i}': 'VARCHAR'" for i in range(len(header))) + "}"
        picks = ", ".join(f"c{header.index(c)} AS {ident(c)}" for c in columns)
        options = (
            f"header = true, auto_detect = false, columns = {spec}, delim = {literal(self.config.delimiter)}, "
            "quote = '\"', escape = '\"', allow_quoted_nulls = true, strict_mode = true, null_padding = false, "
            f"encoding = 'utf-8', max_line_size = {MAX_ROW_BYTES}"
        )
        # names and the path are quoted by ident() and literal()
        sql = f"SELECT {row_number()}, {picks} FROM read_csv({literal(str(self.path))}, {options})"  # noqa: S608
        try:
            return con.sql(sql)
        except duckdb.Error as exc:
            raise (self.explain(exc) or SourceError(f"{self.description}: cannot read ({type(exc).__name__})")) from None

    def _transcoded(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        try:
            reader = pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(encoding=self.config.encoding, block_size=8 << 20),
                parse_options=pacsv.ParseOptions(delimiter=self.config.delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns),
                    column_types={c: pa.string() for c in columns},
                    strings_can_be_null=True,
                    null_values=[""],
                    quoted_strings_can_be_null=True,
                ),
            )
        except (pa.ArrowInvalid, UnicodeError) as exc:
            raise SourceError(f"{self.description}: parse error in the first rows: {self._arrow_reason(exc)}") from None
        except OSError as exc:
            raise SourceError(f"{self.description}: cannot read ({_safe_arrow_message(exc)})") from None

        def batches() -> Iterator[pa.RecordBatch]:
            start = 0
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, UnicodeError) as exc:
                    raise SourceError(
                        f"{self.description}: parse error after data row {start}: {self._arrow_reason(exc)}"
                    ) from None
                start += batch.num_rows
                yield batch.select(list(columns))

        schema = pa.schema([pa.field(c, pa.string()) for c in columns])
        stream = self._stream.reader(schema, batches(), close=reader.close)
        picks = ", ".join(ident(c) for c in columns)
        return con.from_arrow(stream).select(f"{row_number()}, {picks}")

    def _arrow_reason(self, exc: BaseException) -> str:
        if isinstance(exc, UnicodeError):
            return f"not valid {self.config.encoding} text; set the source's `encoding`"
        return _safe_arrow_message(exc)

    def explain(self, exc: Exception) -> SourceError | None:
        if not self._native():
            return self._stream.explain(exc)
        msg = str(exc)
        line = _CSV_LINE.search(msg)
        where = f"parse error on line {line.group(1)}" if line else "parse error"
        if "Invalid unicode" in msg or "not utf-8 encoded" in msg:
            reason = f"not valid {self.config.encoding} text; set the source's `encoding`"
        elif count := _FIELD_COUNT.search(msg):
            reason = f"{count.group(2)} field(s) where the header has {count.group(1)}"
        elif "unterminated quote" in msg:
            reason = "a quoted value has no closing quote"
        elif "Maximum line size" in msg:
            reason = f"a row is longer than {MAX_ROW_BYTES:,} bytes"
        elif "No files found" in msg or "No such file" in msg:
            return SourceError(f"{self.description}: file not found")
        elif line or "CSV" in msg:
            reason = "the row does not follow the CSV format"
        else:
            return None
        return SourceError(f"{self.description}: {where}: {reason} (the row is not shown)")


class ParquetFileSource:
    def __init__(self, config: ParquetSource, base_dir: Path) -> None:
        self.path = config.path if config.path.is_absolute() else base_dir / config.path
        self.description = f"Parquet file {self.path}"

    def _unreadable(self, exc: BaseException) -> SourceError:
        if isinstance(exc, FileNotFoundError) or "No files found" in str(exc):
            return SourceError(f"{self.description}: file not found")
        return SourceError(f"{self.description}: not a readable Parquet file (truncated or corrupt: {type(exc).__name__})")

    def columns(self) -> list[str]:
        try:
            return list(pq.read_schema(self.path).names)
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(exc) from None

    def relation(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        if not self.path.exists():
            raise SourceError(f"{self.description}: file not found")
        scan = f"read_parquet({literal(str(self.path))})"
        try:
            schema = con.sql(f"SELECT * FROM {scan}")  # noqa: S608 - the path is a literal()
        except duckdb.Error as exc:
            raise self._unreadable(exc) from None
        check_columns(self.description, columns, schema.columns)
        types = dict(zip(schema.columns, schema.types, strict=True))
        picks = ", ".join(f"{as_text(ident(c), types[c].id)} AS {ident(c)}" for c in columns)
        if "file_row_number" in schema.columns:  # DuckDB cannot add its own: the scan's order is the file's
            return con.sql(f"SELECT {row_number()}, {picks} FROM {scan}")  # noqa: S608 - quoted
        scan = f"read_parquet({literal(str(self.path))}, file_row_number = true)"
        return con.sql(f"SELECT file_row_number::BIGINT AS {ROW}, {picks} FROM {scan}")  # noqa: S608 - quoted

    def explain(self, exc: Exception) -> SourceError | None:
        msg = str(exc)
        if "decode" in msg or "UTF-8" in msg or "utf-8" in msg:
            return SourceError(f"{self.description}: a binary column holds bytes that are not UTF-8 text")
        if str(self.path) in msg or "Parquet" in msg or "parquet" in msg:
            return self._unreadable(exc)
        return None
