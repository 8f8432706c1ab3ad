"""The SQL forms of the identifier rules, for DuckDB over a whole table.

The Python rules in `normalize.py` are the reference. SQL takes only the values whose shape it can
vouch for: printable ASCII (so trimming, lower-casing and `\\s` mean the same in both), emails, and
phones that are plain NANP numbers. Every other value is flagged for the Python rules, value by
value (`fallback` columns); a differential test holds the two paths equal on arbitrary input.

Each platform's form of a value derives from one cleaning of it: Google's email differs from Meta's
only for Gmail addresses (dots and `+tags` dropped), so outside Gmail it is hashed once; phones are
E.164 with `+` for Google and without it for Meta.
"""

from __future__ import annotations

from dataclasses import dataclass

KEY_NAMESPACE = "connector:key:"
_ASCII = "'[ -~]*'"
_GMAIL = "('gmail.com', 'googlemail.com')"
_NANP_REGIONS = ("US", "CA")


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def printable(col: str) -> str:
    """True where SQL may take the value (NULL counts: it has nothing to normalize)."""
    return f"({col} IS NULL OR regexp_full_match({col}, {_ASCII}))"


def member_key(key_col: str | None, id_cols: list[str]) -> tuple[str, str]:
    """(key expression, SQL-can-take-it expression). With a key column: sha256 of the trimmed key (a blank
    key is NULL: the row has no member); without: of the identifiers' raw values joined by U+001F."""
    if key_col is None:
        joined = ", ".join(f"coalesce({quote(c)}, '')" for c in id_cols)
        return f"unhex(left(sha256({literal(KEY_NAMESPACE)} || concat_ws(chr(31), {joined})), 32))", "true"
    k = quote(key_col)
    expr = f"CASE WHEN trim({k}) <> '' THEN unhex(left(sha256({literal(KEY_NAMESPACE)} || trim({k})), 32)) END"
    return expr, printable(k)


def fingerprint(cols: list[str]) -> str:
    """A 64-bit hash of the raw row: a row with the same fingerprint needs no normalizing again."""
    return "hash(" + ", ".join(f"coalesce({quote(c)} || 'v', '')" for c in cols) + ")"


@dataclass(frozen=True, slots=True)
class Cleaned:
    """One identifier column cleaned once for every platform: `clean` is a marked VARCHAR ('h' + hex for
    a value given already hashed, else a field letter + the cleaned value; NULL when absent or invalid),
    `present` says a value was given, `fallback` that the Python rules must take the value instead."""

    clean: str
    present: str
    fallback: str


def _hashed(t: str) -> str:
    return f"(length({t}) = 64 AND regexp_full_match({t}, '[0-9A-Fa-f]{{64}}'))"


def clean_email(col: str) -> Cleaned:
    v = quote(col)
    t = f"trim({v})"
    e = f"lower({t})"
    valid = (
        f"(length({v}) <= 320 AND length({e}) <= 254 AND length(split_part({e}, '@', 1)) <= 64 "
        f"AND regexp_full_match({e}, '[^@\\s]+@[^@\\s]+\\.[^@\\s.]+'))"
    )
    clean = f"CASE WHEN {_hashed(t)} THEN 'h' || {e} WHEN {valid} THEN 'e' || {e} END"
    return Cleaned(clean=clean, present=f"({t} <> '')", fallback=f"NOT {printable(v)}")


def clean_phone(col: str, region: str) -> Cleaned:
    """Phones SQL can vouch for: plain NANP numbers, with `+1` or `1`, or bare in a NANP region."""
    v = quote(col)
    t = f"trim({v})"
    compact = f"regexp_replace({t}, '[\\s\\-.()/]', '', 'g')"
    bare = "?" if region.upper() in _NANP_REGIONS else ""
    nanp = f"regexp_full_match({compact}, '(\\+1|1){bare}[2-9][0-9]{{2}}[2-9][0-9]{{6}}')"
    clean = f"CASE WHEN {_hashed(t)} THEN 'h' || lower({t}) WHEN {nanp} THEN 'p' || right({compact}, 10) END"
    fallback = f"(NOT {printable(v)} OR ({t} <> '' AND NOT {_hashed(t)} AND NOT {nanp}))"
    return Cleaned(clean=clean, present=f"({t} <> '')", fallback=fallback)


def digest(field: str, platform: str, clean: str, shared: str | None = None) -> str:
    """The payload digest (BLOB) of a cleaned column for a platform. `shared`: a column holding the
    same field's digest for the other platform, reused where both forms are equal."""
    rest = f"substr({clean}, 2)"
    given = f"left({clean}, 1) = 'h'"
    if field == "phone":
        form = "'+1' || " if platform == "google" else "'1' || "
        return f"CASE WHEN {given} THEN unhex({rest}) ELSE unhex(sha256({form}{rest})) END"
    base = shared or f"CASE WHEN {given} THEN unhex({rest}) ELSE unhex(sha256({rest})) END"
    if platform != "google":
        return base
    dom = f"split_part({rest}, '@', 2)"
    local = f"replace(split_part(split_part({rest}, '@', 1), '+', 1), '.', '')"
    return (
        f"CASE WHEN left({clean}, 1) = 'e' AND {dom} IN {_GMAIL} "
        f"THEN CASE WHEN {local} <> '' THEN unhex(sha256({local} || '@' || {dom})) END ELSE {base} END"
    )
