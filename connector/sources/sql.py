"""SQL query source, streamed to DuckDB as Arrow record batches.

PostgreSQL (``postgresql``, ``postgresql+psycopg``, ``postgresql+psycopg2`` URLs) is read through
the ADBC PostgreSQL driver: typed Arrow batches straight from the server (COPY in binary), turned
into text by DuckDB. Every other URL, SQLite included, goes through SQLAlchemy with a server-side
cursor, each partition of rows turned into one batch of text columns. (The ADBC SQLite driver infers
a column's type from the first rows and then fails on a later row of another type, which SQLite
allows; so SQLite stays on SQLAlchemy.)

Values become text as they always have: integral floats and decimals without decimals (1.0 -> "1",
NUMERIC 1.00 -> "1"), booleans "true"/"false", dates and timestamps ISO 8601. Rows keep the query's
order (give the query an ORDER BY if the first of duplicate keys must be a particular one).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from connector.errors import SourceError
from connector.settings import SqlSource
from connector.sources.base import (
    ArrowStream,
    as_text,
    check_columns,
    ident,
    row_number,
    text_batch,
    text_schema,
)

_ADBC_POSTGRES_DRIVERS = {"postgresql", "postgresql+psycopg", "postgresql+psycopg2"}


def _to_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, Decimal) and v.is_finite() and v == v.to_integral_value():
        return str(int(v))
    if isinstance(v, dt.date | dt.datetime):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


class SqlQuerySource:
    def __init__(self, config: SqlSource, base_dir: Path) -> None:
        self.config = config
        try:
            url = make_url(config.url.get_secret_value())
        except ArgumentError:
            raise SourceError("sql source: `url` is not a valid SQLAlchemy URL") from None
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            db = Path(url.database)
            if not db.is_absolute():
                # relative SQLite paths are relative to the config file, like every other path
                url = url.set(database=str(base_dir / db))
            if not Path(url.database or "").exists():
                raise SourceError(f"sql source: SQLite database {url.database} not found")
        self.url = url
        self.description = f"sql query on {url.get_backend_name()}://{url.host or ''}/{url.database or ''}"
        self._stream = ArrowStream(self.description)

    @property
    def uses_adbc(self) -> bool:
        return self.url.drivername in _ADBC_POSTGRES_DRIVERS

    def _fail(self, exc: BaseException, start: int | None = None) -> SourceError:
        # the driver message names the problem; the URL (and its password) is never included
        detail = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
        detail = detail.strip().split("\n", 1)[0][:300]
        if self.url.password:
            detail = detail.replace(str(self.url.password), "***")
        after = "" if start is None else f" after {start} rows"
        return SourceError(f"{self.description}: query failed{after}: {detail}")

    def columns(self) -> list[str]:
        if self.uses_adbc:
            with _adbc_errors(self):
                conn = _adbc_connect(self.url)
                try:
                    with conn.cursor() as cur:
                        return list(cur.adbc_execute_schema(self.config.query).names)
                finally:
                    conn.close()
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True).execute(text(self.config.query))
                names = list(result.keys())
                result.close()
                return names
        except SQLAlchemyError as exc:
            raise self._fail(exc) from None
        finally:
            engine.dispose()

    def relation(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        if self.uses_adbc:
            return self._adbc_relation(con, columns)
        return self._sqlalchemy_relation(con, columns)

    def explain(self, exc: Exception) -> SourceError | None:
        return self._stream.explain(exc)

    # ------------------------------------------------------------------ SQLAlchemy

    def _sqlalchemy_relation(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        engine = create_engine(self.url)
        try:
            conn = engine.connect()
            result = conn.execution_options(stream_results=True, yield_per=self.config.batch_size).execute(
                text(self.config.query)
            )
            names = list(result.keys())
            check_columns(self.description, columns, names)
        except SQLAlchemyError as exc:
            engine.dispose()
            raise self._fail(exc) from None
        except BaseException:
            engine.dispose()
            raise
        idx = [names.index(c) for c in columns]
        schema = text_schema(columns)

        def batches() -> Iterator[pa.RecordBatch]:
            start = 0
            try:
                for part in result.partitions(self.config.batch_size):
                    cols = list(zip(*part, strict=True)) if part else [()] * len(names)
                    out = [[v if type(v) is str else _to_str(v) for v in cols[i]] for i in idx]
                    yield text_batch(schema, out)
                    start += len(part)
            except SQLAlchemyError as exc:
                raise self._fail(exc, start) from None

        def close() -> None:
            conn.close()
            engine.dispose()

        stream = self._stream.reader(schema, batches(), close=close)
        return con.from_arrow(stream).select(f"{row_number()}, {', '.join(ident(c) for c in columns)}")

    # ------------------------------------------------------------------ ADBC (PostgreSQL)

    def _adbc_relation(self, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> duckdb.DuckDBPyRelation:
        with _adbc_errors(self):
            conn = _adbc_connect(self.url)
            try:
                cur = conn.cursor()
                cur.execute(self.config.query)
                reader = cur.fetch_record_batch()
            except BaseException:
                conn.close()
                raise
        names = list(reader.schema.names)
        try:
            check_columns(self.description, columns, names)
        except BaseException:
            conn.close()
            raise
        idx = [names.index(c) for c in columns]
        fields = [reader.schema.field(i) for i in idx]
        plans = [_column_plan(self.description, f) for f in fields]
        schema = pa.schema([pa.field(c, p[0]) for c, p in zip(columns, plans, strict=True)])

        def batches() -> Iterator[pa.RecordBatch]:
            start = 0
            with _adbc_errors(self, lambda: start):
                for batch in reader:
                    arrays = [plan[1](batch.column(i)) for i, plan in zip(idx, plans, strict=True)]
                    yield pa.RecordBatch.from_arrays(arrays, schema=schema)
                    start += batch.num_rows

        def close() -> None:
            cur.close()
            conn.close()

        stream = self._stream.reader(schema, batches(), close=close)
        rel = con.from_arrow(stream)
        texts = []
        for c, plan, typ in zip(columns, plans, rel.types, strict=True):
            expr = as_text(ident(c), typ.id, integral_decimals=True)
            if plan[2]:  # NUMERIC arrives as text: "1.00" -> "1", like a Decimal always was
                expr = f"regexp_replace({expr}, '^(-?[0-9]+)\\.0*$', '\\1')"
            texts.append(f"{expr} AS {ident(c)}")
        return rel.select(f"{row_number()}, {', '.join(texts)}")


def _adbc_connect(url: URL) -> Any:
    import adbc_driver_postgresql.dbapi as pg  # type: ignore[import-untyped]

    uri = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return pg.connect(uri)


@contextmanager
def _adbc_errors(source: SqlQuerySource, rows: Callable[[], int] | None = None) -> Iterator[None]:
    """ADBC errors -> `SourceError` with the driver's first line, password masked."""
    import adbc_driver_manager

    try:
        yield
    except (adbc_driver_manager.Error, pa.ArrowException, OSError) as exc:
        raise source._fail(exc, None if rows is None else rows()) from None


def _column_plan(description: str, field: pa.Field) -> tuple[pa.DataType, Callable[[pa.Array], pa.Array], bool]:
    """(type handed to DuckDB, how to turn the driver's array into it, is it NUMERIC-as-text)."""
    t = field.type
    if isinstance(t, pa.BaseExtensionType):
        storage = t.storage_type
        name = getattr(t, "type_name", None) or t.extension_name
        if t.extension_name == "arrow.uuid":
            return t, lambda a: a, False
        if pa.types.is_string(storage) or pa.types.is_large_string(storage):
            return storage, lambda a: a.storage, name == "numeric"
        raise SourceError(
            f"{description}: column {field.name!r} has a database type ({name}) the connector cannot read as text; "
            f"cast it in the query (for example {field.name}::text)"
        )
    return t, lambda a: a, False
