"""The only place that hashes identifiers: SHA-256 (lowercase hex), member keys, fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_HEX = frozenset("0123456789abcdefABCDEF")
_KEY_NS = b"connector:key:"
_SEP = "\x1f"
_NONE = "\x00"


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in _HEX for c in value)


def hash_once(normalized: str) -> str:
    """Hash a normalized value; a value that already is a SHA-256 hex digest passes through."""
    if len(normalized) == 64 and is_sha256_hex(normalized):
        return normalized.lower()
    return sha256_hex(normalized)


def member_key(value: str) -> str:
    """Opaque, stable ledger key for a member (the raw key is never stored)."""
    return hashlib.sha256(_KEY_NS + value.encode("utf-8")).hexdigest()


def fingerprint(values: Sequence[str | None]) -> int:
    """Cheap 64-bit fingerprint of a raw row; None and "" differ."""
    return int(fingerprints([[v] for v in values])[0])


def member_keys(values: Sequence[str]) -> list[str]:
    """`member_key(v)[:32]` (the ledger's 128-bit key, hex) of many values at once."""
    return [k[:32] for k in map(member_key, values)]


def fingerprints(columns: Sequence[Sequence[str | None]]) -> npt.NDArray[np.uint64]:
    """`fingerprint` of every row of these columns (rows are the columns' positions)."""
    filled = [[_NONE if v is None else v for v in col] for col in columns]
    b2 = hashlib.blake2b
    rows = map(_SEP.join, zip(*filled, strict=True))
    digests = b"".join([b2(j.encode("utf-8", "surrogatepass"), digest_size=8).digest() for j in rows])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)
