"""SQL query source through SQLAlchemy (SQLite, PostgreSQL, ...), streamed with a server-side cursor."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from connector.errors import SourceError
from connector.settings import SqlSource
from connector.sources.base import RowBatch


def _to_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, Decimal) and v == v.to_integral_value():
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

    def read_batches(self, columns: Sequence[str], batch_size: int = 50_000) -> Iterator[RowBatch]:
        engine = create_engine(self.url)
        start = 0
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
                    text(self.config.query)
                )
                names = list(result.keys())
                if any(c not in names for c in columns):
                    miss = [c for c in columns if c not in names]
                    raise SourceError(
                        f"{self.description}: the query returns no column(s) {', '.join(map(repr, miss))}; "
                        f"it returns: {', '.join(map(repr, names))}"
                    )
                idx = [names.index(c) for c in columns]
                for part in result.partitions(batch_size):
                    cols: dict[str, list[str | None]] = {c: [] for c in columns}
                    for row in part:
                        for c, i in zip(columns, idx, strict=True):
                            cols[c].append(_to_str(row[i]))
                    yield RowBatch(start, cols)
                    start += len(part)
        except SourceError:
            raise
        except SQLAlchemyError as exc:
            # the driver message names the problem; the URL (and its password) is never included
            detail = str(getattr(exc, "orig", None) or type(exc).__name__).split("\n", 1)[0][:300]
            raise SourceError(f"{self.description}: query failed after {start} rows: {detail}") from None
        finally:
            engine.dispose()
