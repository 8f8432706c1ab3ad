"""Source protocol: a source hands the engine a DuckDB relation of text columns.

``relation(con, columns)`` returns ``__row`` (BIGINT, the row's position in the source, from 0) and
then exactly the requested columns, in that order, each VARCHAR, NULL where the source has no value.
Duplicate keys are resolved by ``__row`` (the first row wins), so ``__row`` always follows the file's,
the query's or the pages' order.

The relation is lazy: the file or query is read when the engine runs it, and for SQL and HTTP
sources (and CSV files in an encoding DuckDB does not read itself) it is backed by a one-shot Arrow
stream, so it can be scanned **once** (materialize it if it is needed twice). Run whatever scans it
inside ``with reading(source):`` so that an error met while reading becomes a `SourceError` that names
the source, the line or row and what to fix, never the row's contents.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import duckdb
import pyarrow as pa

from connector.errors import SourceError
from connector.settings import CsvSource, HttpSource, ParquetSource, SourceConfig, SqlSource

ROW = "__row"
_SURROGATE = re.compile("[\ud800-\udfff]")


class Source(Protocol):
    description: str

    def columns(self) -> list[str]:
        """The source's column names (header, schema or the first record's fields), without reading rows."""
        ...

    def relation(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        """``__row`` BIGINT then `columns` as VARCHAR; raises `SourceError` if a column is missing."""
        ...

    def explain(self, exc: Exception) -> SourceError | None:
        """The `SourceError` for an error DuckDB raised while scanning this source's relation, or None
        if the error is not the source's."""
        ...


@contextmanager
def reading(source: Source) -> Iterator[None]:
    """Turn errors raised while a source's relation is scanned into the source's `SourceError`."""
    try:
        yield
    except SourceError:
        raise
    except Exception as exc:
        err = source.explain(exc)
        if err is None:
            raise
        raise err from None


def missing_columns(source: str, wanted: Sequence[str], available: Sequence[str]) -> SourceError:
    miss = [c for c in wanted if c not in available]
    return SourceError(
        f"{source}: missing column(s) {', '.join(repr(c) for c in miss)}; "
        f"available: {', '.join(repr(c) for c in available) or 'none'} "
        "(fix the segment's `key`, `identifiers` or `consent` column names, or the export)"
    )


def check_columns(description: str, columns: Sequence[str], available: Sequence[str]) -> None:
    if len(set(columns)) != len(columns):
        raise ValueError(f"columns requested more than once: {sorted({c for c in columns if columns.count(c) > 1})}")
    if any(c not in available for c in columns):
        raise missing_columns(description, columns, available)


def ident(name: str) -> str:
    """A DuckDB identifier for any column name."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """A DuckDB string literal."""
    return "'" + value.replace("'", "''") + "'"


def row_number() -> str:
    """``__row`` for a scan that yields rows in source order (a CSV read or an Arrow stream)."""
    return f"(row_number() OVER () - 1)::BIGINT AS {ROW}"


def as_text(expr: str, type_id: str, *, integral_decimals: bool = False) -> str:
    """SQL turning a typed value into the text the connector has always used for it: integral floats
    without ".0" (1.0 -> "1"), booleans "true"/"false", timestamps ISO 8601 ("2024-01-02T03:04:05",
    microseconds only when there are some; with a time zone: in UTC, "+00:00"), everything else
    DuckDB's text form. NULL stays NULL."""
    t = type_id.lower()
    if t == "varchar":
        return expr
    if t in ("float", "double"):
        x = f"{expr}::DOUBLE"
        return (f"CASE WHEN isfinite({x}) AND {x} = trunc({x}) AND abs({x}) < 1e38 "
                f"THEN CAST(CAST({x} AS HUGEINT) AS VARCHAR) ELSE CAST({x} AS VARCHAR) END")  # fmt: skip
    if t == "decimal" and integral_decimals:
        return f"CASE WHEN {expr} = trunc({expr}) THEN CAST(CAST({expr} AS HUGEINT) AS VARCHAR) ELSE CAST({expr} AS VARCHAR) END"
    if t in ("timestamp", "timestamp_s", "timestamp_ms", "timestamp_ns"):
        return _iso(f"{expr}::TIMESTAMP", "")
    if t == "timestamp with time zone":
        return _iso(f"timezone('UTC', {expr})", "+00:00")
    if t == "blob":
        return f"decode({expr})"  # an error if not UTF-8 (explained as such)
    return f"CAST({expr} AS VARCHAR)"


def _iso(ts: str, suffix: str) -> str:
    tail = f" || {literal(suffix)}" if suffix else ""
    return (f"CASE WHEN microsecond({ts}) % 1000000 = 0 THEN strftime({ts}, '%Y-%m-%dT%H:%M:%S'){tail} "
            f"ELSE strftime({ts}, '%Y-%m-%dT%H:%M:%S.%f'){tail} END")  # fmt: skip


class ArrowStream:
    """A one-shot Arrow stream a source hands DuckDB: it keeps the error that stopped it (DuckDB only
    passes the text on), so `explain` can give back the source's own `SourceError`."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.failure: SourceError | None = None

    def reader(self, schema: pa.Schema, batches: Iterator[pa.RecordBatch],
               close: Callable[[], None] | None = None) -> pa.RecordBatchReader:  # fmt: skip
        self.failure = None

        def guarded() -> Iterator[pa.RecordBatch]:
            try:
                yield from batches
            except SourceError as exc:
                self.failure = exc
                raise
            except Exception as exc:
                self.failure = SourceError(f"{self.description}: reading failed ({type(exc).__name__})")
                raise
            finally:
                if close is not None:
                    close()

        return pa.RecordBatchReader.from_batches(schema, guarded())

    def explain(self, exc: Exception) -> SourceError | None:
        if self.failure is not None:
            return self.failure
        if "reading the Arrow source failed" in str(exc):  # not "already consumed": scanning twice is the caller's bug
            return SourceError(f"{self.description}: reading failed ({type(exc).__name__})")
        return None


def text_batch(schema: pa.Schema, columns: Sequence[Sequence[str | None]]) -> pa.RecordBatch:
    """Python strings -> one batch of text columns. A lone surrogate (JSON allows "\\ud800") cannot be
    UTF-8: it becomes U+FFFD, so the value is invalid for its identifier but the row stays."""
    return pa.RecordBatch.from_arrays([_text_array(c) for c in columns], schema=schema)


def _text_array(values: Sequence[str | None]) -> pa.Array:
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:
        return pa.array([None if v is None else _SURROGATE.sub("\ufffd", v) for v in values], pa.string())


def text_schema(columns: Sequence[str]) -> pa.Schema:
    return pa.schema([pa.field(c, pa.string()) for c in columns])


def open_source(config: SourceConfig, base_dir: Path) -> Source:
    if isinstance(config, CsvSource):
        from connector.sources.files import CsvFileSource

        return CsvFileSource(config, base_dir)
    if isinstance(config, ParquetSource):
        from connector.sources.files import ParquetFileSource

        return ParquetFileSource(config, base_dir)
    if isinstance(config, SqlSource):
        from connector.sources.sql import SqlQuerySource

        return SqlQuerySource(config, base_dir)
    if isinstance(config, HttpSource):
        from connector.sources.http import HttpJsonSource

        return HttpJsonSource(config)
    raise TypeError(type(config).__name__)
