"""The SQL forms of the identifier rules against the Python rules (the reference), on arbitrary input.

What the engine sends comes from `ColumnNormalizer` (SQL, with flagged values through the Python rules);
these tests hold its payloads and reasons equal to `Normalizer.normalize` row by row, and the SQL member
key equal to `hashing.member_key`.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.identifiers import sql as idsql
from connector.identifiers.columns import ColumnNormalizer
from connector.identifiers.hashing import member_key
from connector.identifiers.normalize import NO_IDENTIFIER, Normalizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sql_path import through_sql

GOLDEN = Path(__file__).parent / "golden" / "members.csv"

MESSY_EMAILS = [
    None,
    "",
    "   ",
    " Mary@Example.COM ",
    "Jane.Doe+news@Gmail.com",
    " j.a.n.e@googlemail.com",
    "+x@gmail.com",
    ".@gmail.com",
    "a.b+c@notgmail.com",
    "a.b+c@gmail.co",
    "A.B+C@GoogleMail.COM",
    "no-at-sign",
    "a@b",
    "a@@b.com",
    "é@exämple.de",
    "x" * 65 + "@a.com",
    "F1904CF1A9D73A55FA5DE0AC823C4403DED71AFD4C3248D00BDCD0866552BB79",
    "g" * 64,
    "a b@c.com",
]
MESSY_PHONES = [
    None,
    "",
    " ",
    "+1 415 555 0134",
    "(415) 555-0134",
    "415.555.0134",
    "0044 20 7946 0958",
    "020 7946 0958",
    "+49 30 901820",
    "12",
    "phone",
    "+1415555013412345678",
    "1-800-FLOWERS",
    "9B436BCA284EE447E77D2B7A5CD2F7E36B18127E498AEC4AFD7539B7638FDF40",
    "+",
    "٤١٥٥٥٥٠١٣٤",
    # characters outside printable ASCII around or inside an otherwise plain number: the Python rules' to judge
    "\t+1 415 555 0134\n",
    "\u00a0(415) 555-0134\u3000",
    "+1 415 555\u00a00134",
    "".join(chr(0xFF10 + int(d)) for d in "4155550134"),  # fullwidth digits
    "4155550134\x00",
]




def through_python(rows: list[dict[str, str | None]], fields: list[str], platform: str, region: str,
                   ) -> list[tuple[dict[str, str], set[str]]]:  # fmt: skip
    norm = Normalizer(platform, fields, region)
    out = []
    for r in rows:
        res = norm.normalize({f: r.get(f) for f in fields})
        out.append((res.payload, {why for why in res.errors.values() if why != NO_IDENTIFIER}))
    return out


def assert_same(rows: list[dict[str, str | None]], fields: list[str], region: str) -> None:
    got = through_sql(rows, fields, ["meta", "google"], region)
    for p in ("meta", "google"):
        want = through_python(rows, fields, p, region)
        for row, g, w in zip(rows, got[p], want, strict=True):
            assert g == w, (p, region, row)


@pytest.mark.parametrize("region", ["US", "gb", "DE", "CA"])
def test_messy_emails_and_phones_as_the_python_rules(region: str) -> None:
    rows = [{"email": e, "phone": p} for e in MESSY_EMAILS for p in MESSY_PHONES]
    assert_same(rows, ["email", "phone"], region.upper())
    assert_same(rows, ["phone"], region.upper())
    assert_same(rows, ["email"], region.upper())


def test_nanp_phones_of_every_area_code_as_the_python_rules() -> None:
    """The SQL validity check of plain NANP numbers (the US number types' pattern alone where the shape
    already satisfies the general pattern) gives the Python rules' answer, which the normalize tests hold
    to phonenumbers', for every area code: valid, invalid and unassigned exchanges alike."""
    rows = [{"phone": f"{npa}{rest}"} for npa in range(200, 1000)
            for rest in ("2530000", "5550134", "2345678", "9876543", "1234567", "9119999")]  # fmt: skip
    assert_same(rows, ["phone"], "US")


def test_golden_members_as_the_python_rules() -> None:
    with GOLDEN.open(encoding="utf-8") as f:
        rows = [{"email": r.get("email") or None, "phone": r.get("phone") or None}
                for r in csv.DictReader(line for line in f if not line.startswith("#"))]  # fmt: skip
    assert len(rows) > 20
    assert_same(rows, ["email", "phone"], "US")


def test_most_usual_values_take_the_sql_path() -> None:
    # the fast path is live: plain shapes never reach the Python rules
    rows = [{"email": " Mary.Smith+x@GMAIL.com ", "phone": "(415) 555-0134"}, {"email": "a@b.co", "phone": "+1 415 555 0134"}]
    ids = ColumnNormalizer({"email": "email", "phone": "phone"}, ["meta", "google"], "US")
    con = duckdb.connect()
    con.register("t", pa.table({k: pa.array([r[k] for r in rows]) for k in ("email", "phone")}))
    (rb,) = con.sql(ids.select("SELECT * FROM t", "true")).to_arrow_table().combine_chunks().to_batches()
    assert ids.fallback_count(ids.clean(rb)) == 0
    assert_same(rows, ["email", "phone"], "US")


phones = st.one_of(
    st.from_regex(r"(\+|00|011)?1?[ (.-]{0,2}[0-9]{3}[ ).-]{0,2}[0-9]{3}[ .-]?[0-9]{4}", fullmatch=True),
    st.from_regex(r"\+?[0-9 ().-]{0,20}", fullmatch=True),
    st.text(max_size=30),
)
emails = st.one_of(
    st.emails().map(lambda e: e.upper() if len(e) % 3 == 0 else e),
    st.from_regex(r"[ ]?[A-Za-z0-9.+_-]{0,12}@(gmail|googlemail|example)\.(com|co)[ ]?", fullmatch=True),
    st.text(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), emails), st.one_of(st.none(), phones)), min_size=1, max_size=30),
       st.sampled_from(["US", "GB", "CA", "DE"]))  # fmt: skip
def test_any_emails_and_phones_as_the_python_rules(pairs: list[tuple[str | None, str | None]], region: str) -> None:
    assert_same([{"email": e, "phone": p} for e, p in pairs], ["email", "phone"], region)


def sql_keys(values: list[str | None], key: bool = True) -> list[str | None]:
    con = duckdb.connect()
    con.register("t", pa.table({"id": pa.array(values, pa.string()), "e": pa.array(values, pa.string())}))
    expr = idsql.member_key("id", ["e"]) if key else idsql.member_key(None, ["id", "e"])
    out = [None if v is None else v.hex() for (v,) in con.sql(f"SELECT {expr} FROM t").fetchall()]
    con.close()
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=20), st.sampled_from([" C1 ", "\u3000C2\t", "\xa0", "é "])),
                min_size=1, max_size=20))  # fmt: skip
def test_member_keys_in_sql_are_the_python_keys(values: list[str | None]) -> None:
    values = [v for v in values if v is None or "\x00" not in v]
    want = [member_key(v.strip())[:32] if v is not None and v.strip() else None for v in values]
    assert sql_keys(values) == want
    keyless = [member_key("\x1f".join([v or "", v or ""]))[:32] for v in values]
    assert sql_keys(values, key=False) == keyless
