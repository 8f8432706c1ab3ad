"""Member keys: a member's identifiers packed into one `bytes` object, the key of the emulators' member dicts.

Each identifier is a tag byte followed by its value: a SHA-256 (a tag below 0x80) as its 32 raw bytes, any
other value (tag 0x80 and above) as its UTF-8 length (an unsigned LEB128 varint) and its UTF-8 bytes. A member
with a hashed email and a hashed phone is a 66-byte key. A key is built from hex text with one
`bytes.fromhex` (the tag's two hex digits, then the digest's 64), so the keys of a 10,000-row call cost a few
milliseconds; and a dict of `bytes` keys and number values holds nothing the garbage collector tracks, so
millions of members cost it nothing (a dict of tuples is walked by every full collection).

Meta tags are the identifier's position in the audience's schema; Google tags name the identifier
(`GOOGLE_NAMES`), and a Google member's identifiers are sorted, so one person is one key whatever the order
its identifiers came in.
"""

from __future__ import annotations

from collections.abc import Iterable

TEXT = 0x80
DIGEST_BYTES = 32

# `connector`'s Google payload keys, as both Google emulators name a member's identifiers
GOOGLE_NAMES = ("email", "phone", "first_name", "last_name", "country_code", "postal_code")
GOOGLE_HASHED = frozenset({"email", "phone", "first_name", "last_name"})
_GOOGLE_TAG = {name: tag for tag, name in enumerate(GOOGLE_NAMES)}


def hashed(tag: int, hex64: str) -> str:
    """The hex text of a hashed identifier; `hex64` must already be checked as 64 lowercase hex digits."""
    return f"{tag:02x}{hex64}"


def text(tag: int, value: str) -> str:
    """The hex text of an identifier kept as it is (Meta MADID/EXTERN_ID, Google country and postal codes)."""
    raw = value.encode()
    n, size = len(raw), bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        size.append(low | (0x80 if n else 0))
        if not n:
            break
    return f"{tag | TEXT:02x}{size.hex()}{raw.hex()}"


def pack(pieces: Iterable[str]) -> bytes:
    """A member key from the hex text of its identifiers (`hashed`, `text`)."""
    return bytes.fromhex("".join(pieces))


def unpack(key: bytes) -> list[tuple[int, str]]:
    """A member key's identifiers as (tag, value): digests as lowercase hex, other values as they came."""
    out: list[tuple[int, str]] = []
    i, end = 0, len(key)
    while i < end:
        tag = key[i]
        i += 1
        if tag < TEXT:
            out.append((tag, key[i : i + DIGEST_BYTES].hex()))
            i += DIGEST_BYTES
            continue
        size = shift = 0
        while True:
            byte = key[i]
            i += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        out.append((tag - TEXT, key[i : i + size].decode()))
        i += size
    return out


def google_piece(name: str, value: str) -> str:
    """One Google identifier's hex text; hashed values must already be checked as 64 lowercase hex digits."""
    tag = _GOOGLE_TAG[name]
    return hashed(tag, value) if name in GOOGLE_HASHED else text(tag, value)


def google_key(pieces: list[str]) -> bytes:
    """A Google member's key from its identifiers' hex text (`google_piece`), in any order."""
    pieces.sort()
    return bytes.fromhex("".join(pieces))


def google_pairs(key: bytes) -> frozenset[tuple[str, str]]:
    """A Google member key as its (name, value) pairs."""
    return frozenset((GOOGLE_NAMES[tag], value) for tag, value in unpack(key))
