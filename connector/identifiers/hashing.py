"""SHA-256: one value at a time in Python (the reference), and whole Arrow columns at once."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from datafusion import SessionConfig, SessionContext, col
from datafusion import functions as F

_HEX = frozenset("0123456789abcdefABCDEF")
KEY_NAMESPACE = "connector:key:"


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def sha256_hexes(values: Iterable[str]) -> list[str]:
    """`sha256_hex` of many values."""
    sha = hashlib.sha256
    return [sha(v.encode("utf-8")).hexdigest() for v in values]


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in _HEX for c in value)


def hash_once(normalized: str) -> str:
    """Hash a normalized value; a value that already is a SHA-256 hex digest passes through."""
    if len(normalized) == 64 and is_sha256_hex(normalized):
        return normalized.lower()
    return sha256_hex(normalized)


def member_key(value: str) -> str:
    """Opaque, stable ledger key of a member (the raw key is never stored); the ledger keeps its first
    16 bytes. A lone surrogate (JSON sources can carry one) is hashed as it is."""
    return hashlib.sha256((KEY_NAMESPACE + value).encode("utf-8", "surrogatepass")).hexdigest()


def sha256_columns(columns: Mapping[str, tuple[pa.Array, str]], size: int = 32) -> dict[str, pa.Array]:
    """SHA-256 digests (binary, their first `size` bytes; NULL where the value is NULL) of whole string
    columns: for each name, `(values, prefix)` hashes `prefix + value`. Hashed by DataFusion (Rust `sha2`,
    with the CPU's SHA instructions where it has them), which returns the digests as bytes: a fifth of the
    CPU time of DuckDB's `unhex(sha256(...))` (see `benchmarks/floor.py`)."""
    if not columns:
        return {}
    arrays = {}
    for name, (values, prefix) in columns.items():
        arrays[name] = pc.binary_join_element_wise(prefix, values, "") if prefix else values
    exprs = [F.sha256(col(name)).alias(name) for name in arrays]
    out = _context().from_arrow(pa.table(arrays)).select(*exprs).to_arrow_table()
    return {name: _first(out.column(name), size) for name in columns}


def unhex_column(hexes: pa.Array) -> pa.Array:
    """A column of 64-digit hex strings (NULL allowed) as 32-byte binary values."""
    out = _context().from_arrow(pa.table({"h": hexes})).select(F.decode(col("h"), "hex").alias("h")).to_arrow_table()
    return _first(out.column("h"), 32)


def _first(digests: pa.ChunkedArray, size: int) -> pa.Array:
    whole = digests.combine_chunks() if digests.num_chunks != 1 else digests.chunk(0)
    whole = whole.cast(pa.binary())
    return whole if size == 32 else pc.binary_slice(whole, 0, size)


_local = threading.local()


def _context() -> SessionContext:
    """This thread's DataFusion session (one batch at a time: one partition, one thread)."""
    ctx: SessionContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        # one partition: the rows come back in their order
        ctx = _local.ctx = SessionContext(SessionConfig().with_target_partitions(1))
    return ctx
