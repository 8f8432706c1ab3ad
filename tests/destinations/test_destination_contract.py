"""Destination contract, run against every real destination and its emulator (sandbox = true):
the engine, the ledger, the official client libraries and the emulators' wire protocols together.

After any sequence of source changes the platform audience holds exactly the segment's hashed
members; zero changes make zero write calls; N changes make ceil(N / 10,000) write calls per kind;
faults (transient errors, throttling, dropped connections) do not change the outcome.

The expected audience comes from tests/reference_normalize.py (written from the platforms' pages and
checked against the golden answer keys in tests/identifiers/golden/), never from `connector.identifiers`:
a normalization bug in the connector makes the audiences differ. The members carry what the rules act
on: Gmail addresses with dots and `+tags`, phones written with the UK trunk prefix after the country
code, surnames with punctuation and accents.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.engine import Engine, RunResult, SyncOptions
from connector.settings import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reference_normalize

PLATFORMS = ["meta", "google", "google_ads"]  # google_ads: Google Ads API offline user data jobs
FIELDS = ["customer_id", "email", "phone", "first_name", "last_name", "zip", "country", "consent"]
IDS = ["email", "phone", "first_name", "last_name", "zip", "country"]
TOKEN_META = "sandbox-token"


LAST_NAMES = ["O'Neil", "Ruiz-Ortega", "Smith", "García", "D\u2019Angelo", "Müller Jr.", "Le Pen"]


def person(i: int, **over: str) -> dict[str, str]:
    # every member keeps three valid identifiers (email, phone, address): the google_ads request count
    # below packs whole people by identifier count
    email = f"Person.{i}+shop@GMail.com" if i % 3 == 0 else f"Person.{i}@Example.com"
    phone = f"+44 (0)20 7946 {i % 10000:04d}" if i % 5 == 0 else f"+1 415 555 {i % 10000:04d}"
    row = {"customer_id": f"C{i}", "email": email, "phone": phone, "first_name": "Mary", "last_name": LAST_NAMES[i % 7],
           "zip": "94107", "country": "US", "consent": "granted"}  # fmt: skip
    row.update(over)
    return row


class Pair:
    def __init__(self, tmp: Path, variant: str) -> None:
        self.dir, self.variant = tmp, variant
        platform = "meta" if variant == "meta" else "google"
        self.platform = platform
        self.csv = tmp / "members.csv"
        dest = (
            'type = "meta"\nad_account_id = "act_42"' if platform == "meta" else 'type = "google"\ncustomer_id = "1234567890"\ncustomer_match_terms = "accepted"'
        )
        if variant == "google_ads":
            dest += '\nupload_api = "google_ads"'

        (tmp / "connector.toml").write_text(
            f"""state_dir = "state"
max_remove_share = 1.0
[destinations.d]
{dest}
sandbox = true
max_attempts = 40
backoff_max_seconds = 0.01
[segments.seg]
source = {{ type = "csv", path = "members.csv" }}
key = "customer_id"
identifiers = {{ email = "email", phone = "phone", first_name = "first_name", last_name = "last_name", zip = "zip", country = "country" }}
consent = {{ ad_user_data_column = "consent" }}
destinations = ["d"]
""",
            encoding="utf-8",
        )
        self.rows: list[dict[str, str]] = []

    def write(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows
        with self.csv.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)

    def engine(self) -> Engine:
        return Engine(load_settings(self.dir / "connector.toml"))

    def expected(self) -> set[frozenset[tuple[str, str]]]:
        """The audience the platform must hold: each member's payload per the reference normalizer."""
        out = set()
        for r in self.rows:
            if self.platform == "google" and r["consent"] == "denied":
                continue
            payload = reference_normalize.payload(self.platform, {k: r[k] for k in IDS}, "US")
            if payload:
                out.add(frozenset(payload.items()))
        return out

    def audience(self, engine: Engine, result: RunResult) -> set[frozenset[tuple[str, str]]]:
        dest = engine.destination("d")
        emu = dest.ads_emulator if self.variant == "google_ads" else dest.emulator  # type: ignore[attr-defined]
        assert result.audience_id
        if self.platform == "meta":
            return emu.member_dicts(result.audience_id)  # type: ignore[no-any-return]
        return {frozenset((k, v) for k, v in row if v) for row in emu.members(result.audience_id)}

    def emulator(self, engine: Engine) -> Any:
        dest = engine.destination("d")
        return dest.ads_emulator if self.variant == "google_ads" else dest.emulator  # type: ignore[attr-defined]

    def write_paths(self, engine: Engine) -> list[str]:
        emu = self.emulator(engine)
        if self.variant == "google_ads":  # gRPC: method names instead of paths
            return [e["method"] for e in emu.request_log if e["method"] in ("_add_ops", "_run_job", "_create_job")]
        return [e["path"] for e in emu.request_log if e["method"] in ("POST", "DELETE")]


@pytest.fixture(params=PLATFORMS)
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    yield Pair(tmp_path, request.param)


def sync(p: Pair, rows: list[dict[str, str]] | None = None, faults: dict[str, Any] | None = None,
         **opts: Any) -> tuple[RunResult, set[frozenset[tuple[str, str]]], list[str]]:  # fmt: skip
    if rows is not None:
        p.write(rows)
    with p.engine() as engine:
        emu = p.emulator(engine)
        for k, v in (faults or {}).items():
            setattr(emu.faults, k, v)
        (res,) = engine.sync(None, SyncOptions(**opts))
        emu.faults.error_rates, emu.faults.throttle_rate, emu.faults.drop_rate = {}, 0.0, 0.0
        return res, p.audience(engine, res), p.write_paths(engine)


def test_members_exercise_the_normalization_rules() -> None:
    # the expected audiences differ from a naive normalization: Gmail dots and +tags (Google), the UK
    # trunk prefix after +44, '+' kept for Google and not for Meta, punctuation removed from names
    raw = {k: person(0)[k] for k in IDS}
    sha = reference_normalize.sha256_hex
    assert reference_normalize.payload("google", raw) == {
        "email": sha("person0@gmail.com"), "phone": sha("+442079460000"), "first_name": sha("mary"),
        "last_name": sha("oneil"), "country_code": "US", "postal_code": "94107"}  # fmt: skip
    meta = reference_normalize.payload("meta", raw)
    assert meta["EMAIL"] == sha("person.0+shop@gmail.com") and meta["PHONE"] == sha("442079460000")
    assert meta["LN"] == sha("oneil") and reference_normalize.payload("meta", person(1))["LN"] == sha("ruizortega")


def test_sequence_of_changes_mirrors_the_segment_exactly(pair: Pair) -> None:
    rows = [person(i) for i in range(30)]
    res, audience, _ = sync(pair, rows)
    assert res.status == "success", res.error
    assert audience == pair.expected() and len(audience) == 30
    # leave, join, change identifiers, change formatting only, withdraw consent
    rows = [r for r in rows if r["customer_id"] not in ("C0", "C1")] + [person(i) for i in range(100, 104)]
    rows[0]["email"] = "brand.new@example.com"
    rows[1]["phone"] = "+44 7911 123456"
    rows[2]["email"] = rows[2]["email"].upper()
    rows[3]["consent"] = "denied"
    res, audience, _ = sync(pair, rows)
    assert res.status == "success", res.error
    assert audience == pair.expected()
    res, audience, writes = sync(pair, rows)
    assert res.write_calls == 0 and writes == [] and res.counts.unchanged == len(rows) - (pair.platform == "google")
    assert audience == pair.expected()


def test_full_refresh_replaces_exactly(pair: Pair) -> None:
    rows = [person(i) for i in range(20)]
    sync(pair, rows)
    if pair.platform == "google":
        # the refresh removes what was ingested before T = start - 1 s (a margin for clock skew)
        time.sleep(1.1)
    rows = rows[5:] + [person(50)]
    res, audience, writes = sync(pair, rows, full_refresh=True)
    assert res.status == "success" and res.full_refresh, res.error
    assert audience == pair.expected()
    kind = {"meta": "usersreplace", "google": "audienceMembers:removeAll", "google_ads": "_run_job"}[pair.variant]
    assert any(kind in w for w in writes)


def test_write_calls_are_ceil_n_over_10000(pair: Pair) -> None:
    rows = [person(i) for i in range(25_000)]
    res, audience, writes = sync(pair, rows)
    assert res.status == "success", res.error
    adds = [w for w in writes if w.endswith("/users") or w.endswith("audienceMembers:ingest") or w == "_add_ops"]
    if pair.variant == "google_ads":
        # 3 identifiers a person, whole people per request of at most 10,000 identifiers (3,333 people):
        # batches of 10,000 + 10,000 + 5,000 people -> 4 + 4 + 2 requests, all in one job, run once
        assert len(adds) == 10 and writes.count("_create_job") == 1 and writes.count("_run_job") == 1
    else:
        assert len(adds) == 3
    assert res.write_calls == 3
    assert len(audience) == 25_000
    rows = rows[:24_990] + [person(i) for i in range(30_000, 30_005)]  # 10 leave, 5 join
    res, audience, writes = sync(pair, rows)
    kinds = [w for w in writes if w.endswith("/users") or "audienceMembers:" in w or w == "_create_job"]
    assert len(kinds) == 2 and res.write_calls == 2  # one remove call (or job), one add call (or job)
    assert audience == pair.expected()


def test_converges_under_transient_errors_throttling_and_drops(pair: Pair) -> None:
    errors = {"meta": {"2": 0.2}, "google": {"UNAVAILABLE": 0.2},
              "google_ads": {"CONCURRENT_MODIFICATION": 0.1, "TRANSIENT_ERROR": 0.1}}[pair.variant]
    faults = {"error_rates": errors, "throttle_rate": 0.1, "drop_rate": 0.05, "seed": 7}
    rows = [person(i) for i in range(40)]
    for step in range(4):
        rows = rows[3:] + [person(200 + step * 10 + j) for j in range(4)]
        rows[0]["email"] = f"changed{step}@example.com"
        res, audience, _ = sync(pair, rows, faults=faults, force=True)
        assert res.status == "success", res.error
        assert audience == pair.expected()


def test_permanent_error_stops_with_a_message_and_exit_code_1(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from connector.cli import app

    pair.write([person(i) for i in range(5)])
    if pair.platform == "meta":
        from connector.sandbox import meta_graph

        original = meta_graph.MetaGraphEmulator.__init__

        def expired(self, **kw):  # type: ignore[no-untyped-def]
            original(self, **kw)
            self.expected_token = "a-different-token"  # the configured token is now invalid: code 190

        monkeypatch.setattr(meta_graph.MetaGraphEmulator, "__init__", expired)
        needle = "access token is invalid or expired"
    elif pair.variant == "google_ads":
        from connector.sandbox import google_ads

        original_a = google_ads.GoogleAdsEmulator.__init__

        def not_allowlisted(self, **kw):  # type: ignore[no-untyped-def]
            original_a(self, **kw)
            self.allowlisted = False

        monkeypatch.setattr(google_ads.GoogleAdsEmulator, "__init__", not_allowlisted)
        needle = 'set upload_api = "datamanager"'
    else:
        from connector.sandbox import google_datamanager

        original_g = google_datamanager.DataManagerEmulator.__init__

        def denied(self, **kw):  # type: ignore[no-untyped-def]
            original_g(self, **kw)
            self.faults.error_rates = {"PERMISSION_DENIED": 1.0}

        monkeypatch.setattr(google_datamanager.DataManagerEmulator, "__init__", denied)
        needle = "permission denied"
    result = CliRunner().invoke(app, ["sync", "--config", str(pair.dir / "connector.toml"), "--json"])
    assert result.exit_code == 1
    (run,) = json.loads(result.stdout)["runs"]
    assert run["status"] == "failed" and needle in run["error"]
