"""Segment member sources."""

from connector.sources.base import RowBatch, Source, open_source

__all__ = ["RowBatch", "Source", "open_source"]
