"""The only place that hashes identifiers: SHA-256 (lowercase hex), member keys, fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

_HEX = frozenset("0123456789abcdefABCDEF")
_KEY_NS = b"connector:key:"
_SEP = "\x1f"
_NONE = "\x00"


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


def _utf8(values: Iterable[str]) -> list[bytes]:
    """UTF-8 bytes of each value; a lone surrogate (JSON sources can carry one) is kept as it is, so
    such a value is still a value of its own, not an error that stops the run."""
    values = list(values)
    try:
        return list(map(str.encode, values))
    except UnicodeEncodeError:
        return [v.encode("utf-8", "surrogatepass") for v in values]


def member_key(value: str) -> str:
    """Opaque, stable ledger key for a member (the raw key is never stored)."""
    return hashlib.sha256(_KEY_NS + _utf8([value])[0]).hexdigest()


def fingerprint(values: Sequence[str | None]) -> int:
    """Cheap 64-bit fingerprint of a raw row; None and "" differ."""
    return int(fingerprints([[v] for v in values])[0])


def member_key_array(values: Sequence[str]) -> npt.NDArray[np.bytes_]:
    """The ledger's 128-bit keys (the first 16 bytes of `member_key`) of many values, as one array of
    16-byte strings: no hex text is made for rows that only need looking up."""
    sha, ns = hashlib.sha256, _KEY_NS
    return np.frombuffer(b"".join([sha(ns + v).digest()[:16] for v in _utf8(values)]), dtype="S16")


def hex_of_keys(keys: npt.NDArray[np.bytes_]) -> list[str]:
    """16-byte keys as the ledger's hex text (a key's trailing NUL bytes kept)."""
    text = np.ascontiguousarray(keys).tobytes().hex()
    return [text[i : i + 32] for i in range(0, len(text), 32)]


def member_keys(values: Sequence[str]) -> list[str]:
    """`member_key(v)[:32]` (the ledger's 128-bit key, hex) of many values at once."""
    return hex_of_keys(member_key_array(values))


def fingerprints(columns: Sequence[Sequence[str | None]]) -> npt.NDArray[np.uint64]:
    """`fingerprint` of every row of these columns (rows are the columns' positions)."""
    filled = [[_NONE if v is None else v for v in col] for col in columns]
    b2 = hashlib.blake2b
    encoded = _utf8(map(_SEP.join, zip(*filled, strict=True)))
    digests = b"".join([b2(j, digest_size=8).digest() for j in encoded])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)
