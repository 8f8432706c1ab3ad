"""Golden answer keys (tests/identifiers/golden/, typed in by hand from the platforms' documentation):
the connector's normalizer and the independent reference normalizer (tests/reference_normalize.py)
must both produce exactly the documented values for every golden member, for Google and for Meta.

Hashing is not under test here: the normalized string is. The test hashes each expected normalized
value with hashlib, except the published literal hashes, which are fixed strings."""

from __future__ import annotations

import csv
import hashlib
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from connector.identifiers.normalize import Normalizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reference_normalize as ref
from sql_path import through_sql

GOLDEN = Path(__file__).parent / "golden"
FIELDS = ["email", "phone", "first_name", "last_name", "zip", "country", "city", "state", "gender",
          "date_of_birth", "mobile_ad_id", "external_id"]  # fmt: skip
KEYS = {"google": set(ref.GOOGLE_KEYS), "meta": set(ref.META_KEYS)}
PLATFORMS = ("google", "meta")


def _read(name: str) -> list[dict[str, str]]:
    with (GOLDEN / name).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


MEMBERS = {r["id"]: r for r in _read("members.csv")}
PUBLISHED = {r["normalized"]: r["sha256"] for r in _read("published_hashes.csv")}


def _expected(platform: str) -> dict[str, dict[str, tuple[str, str]]]:
    """member id -> payload key -> (normalized string, how it is sent); a dropped value is absent."""
    out: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    for r in _read(f"expected_{platform}.csv"):
        out[r["id"]]  # listed, even when nothing is sent
        if r["normalized"]:
            out[r["id"]][r["field"]] = (r["normalized"], r["sent"])
    return dict(out)


EXPECTED = {p: _expected(p) for p in PLATFORMS}


def raw_of(member: dict[str, str]) -> dict[str, str | None]:
    return {f: member[f] or None for f in FIELDS}


def wire(expected: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The payload the platform receives for these golden values."""
    return {k: hashlib.sha256(v.encode("utf-8")).hexdigest() if how == "sha256" else v for k, (v, how) in expected.items()}


CASES = [(p, m) for p in PLATFORMS for m in MEMBERS]


def test_golden_files_are_consistent() -> None:
    assert len(MEMBERS) >= 60
    for platform in PLATFORMS:
        assert set(EXPECTED[platform]) == set(MEMBERS), f"expected_{platform}.csv must list every member"
        for r in _read(f"expected_{platform}.csv"):
            assert r["field"] in KEYS[platform] | {"*"}, r
            assert (r["sent"] in ("sha256", "as_is")) == bool(r["normalized"]), r
        assert sum(bool(v) for v in EXPECTED[platform].values()) >= 50  # most members send something


def test_published_hashes() -> None:
    # literal hashes from Meta's Custom Audiences page ("hash('sha256', 'mary@example.com')" ...)
    assert PUBLISHED["mary@example.com"] == "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"
    for normalized, literal in PUBLISHED.items():
        assert hashlib.sha256(normalized.encode()).hexdigest() == literal
        assert ref.sha256_hex(normalized) == literal


@pytest.mark.parametrize("platform", PLATFORMS)
def test_published_hash_reaches_the_payload(platform: str) -> None:
    key = "email" if platform == "google" else "EMAIL"
    for mid in ("m03", "m04", "m16"):  # "mary@example.com", "  Mary@Example.COM ", its hash in upper case
        out = Normalizer(platform, FIELDS, "US").normalize(raw_of(MEMBERS[mid]))
        assert out.payload == {key: "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"}, mid


@pytest.mark.parametrize(("platform", "member"), CASES)
def test_reference_normalizer_matches_golden(platform: str, member: str) -> None:
    m = MEMBERS[member]
    got = ref.normalize_member(platform, raw_of(m), m["default_region"])
    assert got == EXPECTED[platform][member], m["source"]


@pytest.mark.parametrize(("platform", "member"), CASES)
def test_normalizer_matches_golden(platform: str, member: str) -> None:
    m = MEMBERS[member]
    out = Normalizer(platform, FIELDS, m["default_region"]).normalize(raw_of(m))
    assert out.payload == wire(EXPECTED[platform][member]), m["source"]
    # a dropped value has its reason, and a member sending nothing says so
    for field in FIELDS:
        if m[field] and not out.payload:
            assert out.errors, member


@pytest.mark.parametrize("platform", PLATFORMS)
def test_email_and_phone_columns_match_golden(platform: str) -> None:
    # the SQL path (a segment of email and phone columns) must send the same golden values
    ekey, pkey = ("email", "phone") if platform == "google" else ("EMAIL", "PHONE")
    by_region: dict[str, list[str]] = defaultdict(list)
    for mid, m in MEMBERS.items():
        if m["email"] or m["phone"]:
            by_region[m["default_region"]].append(mid)
    assert len(by_region) >= 4
    for region, ids in by_region.items():
        # the column path has no country column: members whose row country sets the region are left out
        ids = [i for i in ids if not MEMBERS[i]["country"]]
        rows = [{"email": MEMBERS[i]["email"] or None, "phone": MEMBERS[i]["phone"] or None} for i in ids]
        payloads = [pay for pay, _ in through_sql(rows, ["email", "phone"], [platform], region)[platform]]
        want = [wire({k: v for k, v in EXPECTED[platform][i].items() if k in (ekey, pkey)}) for i in ids]
        assert payloads == want, region
