"""Source protocol: streaming, columnar batches of string values."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from connector.settings import CsvSource, HttpSource, ParquetSource, SourceConfig, SqlSource


@dataclass(slots=True)
class RowBatch:
    start: int
    columns: dict[str, list[str | None]]

    def __len__(self) -> int:
        for v in self.columns.values():
            return len(v)
        return 0


class Source(Protocol):
    description: str

    def read_batches(self, columns: Sequence[str], batch_size: int = 50_000) -> Iterator[RowBatch]: ...


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
