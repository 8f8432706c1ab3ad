"""The only place that hashes identifiers: SHA-256 (lowercase hex), member keys, fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

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
    joined = _SEP.join(_NONE if v is None else v for v in values)
    return int.from_bytes(hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
