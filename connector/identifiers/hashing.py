"""SHA-256: one value at a time in Python (the reference), and whole Arrow columns at once."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import polars as pl
import polars_hash  # noqa: F401  (registers the `chash` expression namespace)
import pyarrow as pa

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


# hex digit (either case) -> its value; other bytes never reach it (the digests are polars-hash's own hex)
_NIBBLE = np.zeros(256, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i


def sha256_columns(columns: Mapping[str, tuple[pa.Array, str]]) -> dict[str, pa.Array]:
    """SHA-256 digests (32-byte binary, NULL where the value is NULL) of whole string columns: for each name,
    `(values, prefix)` hashes `prefix + value`. The columns are hashed together by polars-hash (Rust `sha2`,
    which uses the CPU's SHA instructions where it has them) on polars' threads: about half the CPU time of
    DuckDB's `sha256` and its `unhex`, measured in `benchmarks/floor.py`."""
    if not columns:
        return {}
    frame = pl.DataFrame({name: pl.from_arrow(values) for name, (values, _) in columns.items()})
    exprs = []
    for name, (_, prefix) in columns.items():
        value = pl.lit(prefix) + pl.col(name) if prefix else pl.col(name)
        exprs.append(value.chash.sha2_256().alias(name))  # type: ignore[attr-defined]
    hexes = frame.select(exprs)
    return {name: unhex_column(hexes.get_column(name).to_arrow()) for name in columns}


def unhex_column(hexes: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column of 64-digit hex strings (NULL allowed) as 32-byte binary values."""
    if isinstance(hexes, pa.ChunkedArray):
        hexes = hexes.combine_chunks()
    if not pa.types.is_large_string(hexes.type):
        hexes = hexes.cast(pa.large_string())
    n = len(hexes)
    valid = np.ones(n, dtype=bool) if hexes.null_count == 0 else np.asarray(hexes.is_valid().to_numpy(zero_copy_only=False))
    offsets = np.frombuffer(hexes.buffers()[1], dtype=np.int64)[hexes.offset : hexes.offset + n + 1]
    lengths = np.diff(offsets)
    out = np.zeros((n, 32), dtype=np.uint8)
    if bool((lengths[valid] != 64).any()):
        raise ValueError("not a column of SHA-256 hex digests")
    if valid.any():
        data = hexes.buffers()[2]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        starts = offsets[:-1][valid]
        if bool((lengths[~valid] == 0).all()):  # the valid values lie back to back
            digits = raw[offsets[0] : offsets[-1]].reshape(-1, 32, 2)
        else:
            digits = raw[starts[:, None] + np.arange(64)].reshape(-1, 32, 2)
        out[valid] = (_NIBBLE[digits[..., 0]] << 4) | _NIBBLE[digits[..., 1]]
    bounds = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    mask = None if valid.all() else pa.array(valid).buffers()[1]
    return pa.Array.from_buffers(pa.binary(), n, [mask, pa.py_buffer(bounds), pa.py_buffer(out)],
                                 null_count=int(n - valid.sum()))  # fmt: skip
