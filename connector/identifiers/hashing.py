"""SHA-256: one value at a time in Python (the reference), and whole Arrow columns at once."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from datafusion import SessionConfig, SessionContext

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


def sha256_columns(columns: Mapping[str, tuple[pa.Array, str]], size: int = 32,
                   threads: int | None = None) -> dict[str, pa.Array]:  # fmt: skip
    """SHA-256 digests (binary, their first `size` bytes; NULL where the value is NULL) of whole string
    columns: for each name, `(values, prefix)` hashes `prefix + value`. Hashed by DataFusion (Rust `sha2`,
    with the CPU's SHA instructions where it has them), which returns the digests as bytes: about a quarter
    of the CPU time of DuckDB's `unhex(sha256(...))` (see `benchmarks/floor.py`)."""
    if not columns:
        return {}
    names = [f"c{i}" for i in range(len(columns))]
    values = [pc.binary_join_element_wise(prefix, v, "") if prefix else v for v, prefix in columns.values()]
    batch = pa.RecordBatch.from_arrays(values, names=names)
    out = run_sql(f"SELECT {', '.join(f'sha256({c}) AS {c}' for c in names)} FROM batch", batch, threads)  # noqa: S608 - names of ours
    return {name: _first(out.column(c), size) for name, c in zip(columns, names, strict=True)}


def run_sql(query: str, batch: pa.RecordBatch, threads: int | None = None) -> pa.RecordBatch:
    """DataFusion's result of `query` (a projection) over one batch (the table `batch`), rows in their
    order: the batch is cut in one slice per thread (`threads`, default one per core), each its own
    partition, and the partitions' results are put back in order."""
    ctx = _context()
    n = batch.num_rows
    step = max(1, -(-n // (threads or _PARTITIONS)))
    ctx.register_record_batches("batch", [[batch.slice(i, step)] for i in range(0, n, step)] or [[batch]])
    try:
        df = ctx.sql(query)
        parts = df.collect_partitioned()
        schema = df.schema()
    finally:
        ctx.deregister_table("batch")
    batches = [rb for part in parts for rb in part]
    out = pa.Table.from_batches(batches, schema=batches[0].schema if batches else schema)
    if out.num_rows != n:
        raise RuntimeError(f"DataFusion returned {out.num_rows} rows for {n}")
    return out.combine_chunks().to_batches()[0] if n else pa.RecordBatch.from_pylist([], schema=schema)


def _first(digests: pa.Array, size: int) -> pa.Array:
    digests = digests.cast(pa.binary())
    return digests if size == 32 else pc.binary_slice(digests, 0, size)


_PARTITIONS = max(1, os.cpu_count() or 1)
_local = threading.local()


def _context() -> SessionContext:
    """This thread's DataFusion session: as many partitions as the batch was cut in, none made by DataFusion
    (a round-robin repartition would not keep the rows' order)."""
    ctx: SessionContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        config = SessionConfig().with_target_partitions(_PARTITIONS)
        config = config.set("datafusion.optimizer.enable_round_robin_repartition", "false")
        ctx = _local.ctx = SessionContext(config)
    return ctx
