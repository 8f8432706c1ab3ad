"""Segment member sources: each hands the engine a DuckDB relation of text columns."""

from connector.sources.base import ROW, Source, open_source, reading

__all__ = ["ROW", "Source", "open_source", "reading"]
