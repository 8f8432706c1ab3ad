"""CSV and Parquet sources, read in bounded columnar batches with pyarrow."""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from connector.errors import SourceError
from connector.settings import CsvSource, ParquetSource
from connector.sources.base import RowBatch

# pyarrow quotes the offending row in some parse errors: keep only the part before it (PII).
_ROW_QUOTE = re.compile(r"(:\s*(got|Expected)[^:]*?)(:.*)$", re.S)


def _safe_arrow_message(exc: Exception) -> str:
    msg = str(exc).split("\n", 1)[0]
    msg = _ROW_QUOTE.sub(r"\1", msg)
    return msg[:300]


def _missing(source: str, wanted: Sequence[str], available: Sequence[str]) -> SourceError:
    miss = [c for c in wanted if c not in available]
    return SourceError(
        f"{source}: missing column(s) {', '.join(repr(c) for c in miss)}; "
        f"available: {', '.join(repr(c) for c in available) or 'none'} "
        "(fix the segment's `key`, `identifiers` or `consent` column names, or the export)"
    )


def column_to_strings(col: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Arrow column -> Python strings, ids kept readable (1.0 -> "1", True -> "true")."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.to_pylist()  # type: ignore[no-any-return]
    if pa.types.is_floating(t):
        values: list[Any] = col.to_pylist()
        return [None if v is None else (str(int(v)) if float(v).is_integer() else repr(v)) for v in values]
    if pa.types.is_boolean(t):
        return [None if v is None else ("true" if v else "false") for v in col.to_pylist()]
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return [None if v is None else v.isoformat() for v in col.to_pylist()]
    return pc.cast(col, pa.string()).to_pylist()  # type: ignore[no-any-return]


class CsvFileSource:
    def __init__(self, config: CsvSource, base_dir: Path) -> None:
        self.config = config
        self.path = config.path if config.path.is_absolute() else base_dir / config.path
        self.description = f"CSV file {self.path}"

    def _header(self) -> list[str]:
        enc = self.config.encoding
        if codecs.lookup(enc).name == "utf-8":
            enc = "utf-8-sig"  # a UTF-8 BOM is not part of the first column's name
        try:
            with self.path.open(newline="", encoding=enc) as f:
                row = next(csv.reader(f, delimiter=self.config.delimiter), None)
        except FileNotFoundError:
            raise SourceError(f"{self.description}: file not found") from None
        except UnicodeDecodeError as exc:
            raise SourceError(
                f"{self.description}: header is not valid {self.config.encoding} (byte {exc.start}); "
                "set the source's `encoding`"
            ) from None
        except OSError as exc:
            raise SourceError(f"{self.description}: cannot read ({exc.strerror})") from None
        if not row:
            raise SourceError(f"{self.description}: empty file (no header row)")
        return [c.strip() for c in row]

    def read_batches(self, columns: Sequence[str], batch_size: int = 50_000) -> Iterator[RowBatch]:
        header = self._header()
        if any(c not in header for c in columns):
            raise _missing(self.description, columns, header)
        dupes = {c for c in header if header.count(c) > 1} & set(columns)
        if dupes:
            raise SourceError(f"{self.description}: column(s) {sorted(dupes)} appear more than once in the header")
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
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"{self.description}: {_safe_arrow_message(exc)}") from None
        start = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise SourceError(
                    f"{self.description}: unreadable after data row {start}: {_safe_arrow_message(exc)}"
                ) from None
            for off in range(0, batch.num_rows, batch_size):
                part = batch.slice(off, batch_size)
                yield RowBatch(start, {c: part.column(c).to_pylist() for c in columns})
                start += part.num_rows


class ParquetFileSource:
    def __init__(self, config: ParquetSource, base_dir: Path) -> None:
        self.path = config.path if config.path.is_absolute() else base_dir / config.path
        self.description = f"Parquet file {self.path}"

    def read_batches(self, columns: Sequence[str], batch_size: int = 50_000) -> Iterator[RowBatch]:
        try:
            pf = pq.ParquetFile(self.path)
        except FileNotFoundError:
            raise SourceError(f"{self.description}: file not found") from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"{self.description}: not a readable Parquet file ({_safe_arrow_message(exc)})") from None
        names = pf.schema_arrow.names
        if any(c not in names for c in columns):
            raise _missing(self.description, columns, names)
        start = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
                yield RowBatch(start, {c: column_to_strings(batch.column(c)) for c in columns})
                start += batch.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"{self.description}: unreadable after row {start}: {_safe_arrow_message(exc)}") from None
