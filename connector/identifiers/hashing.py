"""SHA-256 in Python: the reference the SQL forms are held to, and values given already hashed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

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
