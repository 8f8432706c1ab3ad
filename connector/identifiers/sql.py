"""The SQL forms of the identifier rules over a whole table.

Member keys and row fingerprints are DuckDB SQL (the pass that reads the source computes them); the cleaning
of emails and phones is DataFusion SQL, run on each batch of rows to normalize (`columns.py`): its string
functions and regular expressions (Rust `regex`) take a fraction of DuckDB's time, and it returns SHA-256
digests as bytes.

The Python rules in `normalize.py` are the reference. SQL takes only the values whose shape it can
vouch for: printable ASCII (so trimming, lower-casing and white space mean the same in both), emails, and
phones that are plain NANP numbers. Every other value is flagged for the Python rules, value by
value (`fallback` columns); a differential test holds the two paths equal on arbitrary input.

Each platform's form of a value derives from one cleaning of it: Google's email differs from Meta's
only for Gmail addresses (dots and `+tags` dropped), so outside Gmail it is hashed once; phones are
E.164 with `+` for Google and without it for Meta.
"""

from __future__ import annotations

from dataclasses import dataclass

from connector.identifiers.hashing import KEY_NAMESPACE
from connector.identifiers.normalize import US_VALID_PARTS

_ASCII = "'[ -~]*'"
_GMAIL_DOMAINS = ("gmail.com", "googlemail.com")
_NANP_REGIONS = ("US", "CA")


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def printable(col: str) -> str:
    """True where SQL may take the value (NULL counts: it has nothing to normalize)."""
    return f"({col} IS NULL OR regexp_full_match({col}, {_ASCII}))"


# Python's str.strip() removes every character str.isspace() calls white space; DuckDB's trim() only spaces
_PY_SPACE = "".join(ch for ch in map(chr, range(0x3001)) if ch.isspace())


def _strip(col: str) -> str:
    cls = "".join(f"\\x{{{ord(ch):x}}}" for ch in _PY_SPACE)
    return f"CASE WHEN {printable(col)} THEN trim({col}) ELSE regexp_replace({col}, '^[{cls}]+|[{cls}]+$', '', 'g') END"


def member_key(key_col: str | None, id_cols: list[str]) -> str:
    """The 16-byte member key (BLOB), as `hashing.member_key` gives it: the first 16 bytes of the SHA-256
    of `key_preimage`."""
    return f"unhex(left(sha256({key_preimage(key_col, id_cols)}), 32))"


def key_preimage(key_col: str | None, id_cols: list[str]) -> str:
    """What a member key hashes: with a key column, the key stripped as Python strips (a blank key is NULL:
    the row has no member); without one, the identifiers' raw values joined by U+001F; after the namespace."""
    ns = literal(KEY_NAMESPACE)
    if key_col is None:
        joined = ", ".join(f"coalesce({quote(c)}, '')" for c in id_cols)
        return f"{ns} || concat_ws(chr(31), {joined})"
    k = _strip(quote(key_col))
    return f"CASE WHEN {k} <> '' THEN {ns} || {k} END"


def fingerprint(cols: list[str]) -> tuple[str, str]:
    """The raw row's 128-bit fingerprint as two 64-bit hashes of different constructions (`fp`: the
    columns' hashes combined, NULL and '' apart; `fq`: the hash of the values joined by U+001F). A row with
    the same fingerprint as a member is that member unchanged (its key is among the hashed columns): a
    warm run finds unchanged rows by fingerprint alone: with 64 bits, two of 10M members would share one in
    about one ledger of 400,000; with 128, never in practice."""
    quoted = ", ".join(quote(c) for c in cols)
    return f"hash({quoted})", f"hash(concat_ws(chr(31), {quoted}))"


@dataclass(frozen=True, slots=True)
class Cleaned:
    """One identifier column cleaned once for every platform, as projections to stack (`levels`, innermost
    first: each a list of (name, expression) over the level below; no expression is computed twice), in
    DataFusion's SQL over the raw values of one batch (`value`: NULL for rows not to normalize). The last
    level names `clean`: the cleaned value, NULL when absent, invalid or given already hashed; `given`: a
    value given already hashed (lowercase hex); `present`: a value was given; and `fallback`: the Python
    rules must take the value instead."""

    levels: list[list[tuple[str, str]]]
    value: str
    clean: str
    given: str
    present: str
    fallback: str


def _full_match(col: str, pattern: str) -> str:
    """DataFusion: the whole value matches `pattern` (Rust regex syntax)."""
    return f"regexp_like({col}, {literal('^(?:' + pattern + ')$')})"


def _printable(col: str) -> str:
    """DataFusion's `printable` (as no character outside printable ASCII: a search stops at the first one,
    and costs less than a match of the whole value)."""
    return f"({col} IS NULL OR NOT regexp_like({col}, '[^ -~]'))"


def _digits_match(col: str, pattern: str) -> str:
    """`_full_match` of a value of ASCII digits, with `pattern`'s `\\d` as ASCII digits (`(?-u)`): the same
    answer for such a value, from a much smaller automaton than Unicode's digits make (the US number types'
    pattern matched several times faster)."""
    return f"regexp_like({col}, {literal('(?-u)^(?:' + pattern + ')$')})"


_HEX64 = "[0-9A-Fa-f]{64}"


# a printable-ASCII email with its spaces around, matched as the whole raw value: printable ASCII without the
# space and '@' (so without '.' too for the last part of the domain); `(?-u)`: classes of bytes, a smaller automaton
_EMAIL_RAW = "(?-u) *[!-?A-~]+@[!-?A-~]+[.][!-\\-/-?A-~]+ *"


def clean_email(value: str, tag: str) -> Cleaned:
    """Emails SQL can vouch for: printable ASCII (trimming and lower-casing then mean what they mean to
    Python), `local@domain.tld` without spaces, within the lengths the Python rules allow. The usual value is
    told by one match of its raw text (`_EMAIL_RAW`); only the others are checked for being printable (which
    decides between the Python rules and an invalid value)."""
    n = f"_{tag}"
    t, m, ok, e, h = f"{n}_t", f"{n}_m", f"{n}_ok", f"{n}_e", f"{n}_h"
    valid = f"{m} AND length({value}) <= 320 AND length({e}) <= 254 AND length(split_part({e}, '@', 1)) <= 64"
    return Cleaned(
        levels=[
            [(t, f"btrim({value}, ' ')"), (m, _full_match(value, _EMAIL_RAW))],
            [
                (ok, f"CASE WHEN {m} THEN true ELSE {_printable(value)} END"),
                (e, f"lower({t})"), (h, f"(length({t}) = 64 AND {_full_match(t, _HEX64)})"),
            ],
            [
                (f"{n}_clean", f"CASE WHEN {valid} THEN {e} END"),  # a match is printable and no digest (an '@')
                (f"{n}_given", f"CASE WHEN {ok} AND {h} THEN {e} END"),
                (f"{n}_present", f"coalesce({ok} AND {t} <> '', false)"),
                (f"{n}_fallback", f"coalesce(NOT {ok}, false)"),
            ],
        ],
        value=value, clean=f"{n}_clean", given=f"{n}_given", present=f"{n}_present", fallback=f"{n}_fallback",
    )  # fmt: skip


def clean_phone(value: str, region: str, tag: str) -> Cleaned:
    """Phones SQL can vouch for: plain NANP shapes (`+1` and ten digits; in a US or CA segment also ten
    digits, or eleven from `1`) that phonenumbers' US metadata calls valid, as `normalize_phone` takes
    them without phonenumbers. Everything else is the Python rules'. `clean` is the ten digits after +1.

    No printable-ASCII check: a value SQL takes matched a pattern of ASCII characters (the NANP shape once
    ` -.()/` are dropped, or 64 hex digits), and every other value with something in it is the Python
    rules' anyway (a character outside printable ASCII included)."""
    n = f"_{tag}"
    t, c, h, ten, valid = (f"{n}_{x}" for x in ("t", "c", "h", "ten", "valid"))
    national = "1?" if region.upper() in _NANP_REGIONS else "\\+1"
    nanp = _full_match(c, "(\\+1|" + national + ")[2-9][0-9]{9}")
    if US_VALID_PARTS is None:
        is_valid = "false"
    else:
        general, types = US_VALID_PARTS
        # `ten` has the plain shape, [2-9] and nine digits: where that is a whole branch of the general
        # pattern, the general pattern holds for every `ten` and is not matched again
        checks = [] if "[2-9]\\d{9}" in general.split("|") else [_digits_match(ten, general)]
        is_valid = f"coalesce({' AND '.join([*checks, _digits_match(ten, types)])}, false)"
    return Cleaned(
        levels=[
            [(t, f"btrim({value}, ' ')")],
            [(c, f"translate({t}, ' -.()/', '')"), (h, f"(length({t}) = 64 AND {_full_match(t, _HEX64)})")],
            [(ten, f"CASE WHEN {nanp} THEN right({c}, 10) END")],
            [(valid, is_valid)],
            [
                (f"{n}_clean", f"CASE WHEN NOT {h} AND {valid} THEN {ten} END"),
                (f"{n}_given", f"CASE WHEN {h} THEN lower({t}) END"),
                (f"{n}_present", f"coalesce({t} <> '', false)"),
                (f"{n}_fallback", f"coalesce({t} <> '' AND NOT {h} AND NOT {valid}, false)"),
            ],
        ],
        value=value, clean=f"{n}_clean", given=f"{n}_given", present=f"{n}_present", fallback=f"{n}_fallback",
    )  # fmt: skip


def google_gmail(clean: str) -> tuple[str, str]:
    """(whether a cleaned email is a Gmail address, the SHA-256 of Google's form of it: the local part
    without dots and without what follows '+', NULL when that leaves nothing). Outside Gmail Google's form is
    Meta's. A cleaned email has one '@', so its domain is Gmail's where it ends so; the local part is worked
    on only for those rows."""
    gmail = " OR ".join(f"ends_with({clean}, {literal('@' + d)})" for d in _GMAIL_DOMAINS)
    local = f"replace(split_part(split_part({clean}, '@', 1), '+', 1), '.', '')"
    form = f"CASE WHEN {local} <> '' THEN {local} || '@' || split_part({clean}, '@', 2) END"
    return f"coalesce({gmail}, false)", f"CASE WHEN {gmail} THEN sha256({form}) END"
