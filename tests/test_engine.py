"""Engine behaviour end to end against in-memory destinations (real ledger, real CSV source)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
from conftest import Harness, person, write_csv

from connector.engine import Engine, SyncOptions
from connector.errors import FatalError


def fresh_audience(tmp: Path, rows: list[dict[str, str]], dest: str) -> set[frozenset[tuple[str, str]]]:
    """Oracle: what a cold sync of `rows` puts on an empty platform."""
    h = Harness(tmp)
    h.sync(rows, force=True)
    return h.audience(dest)


def test_cold_then_unchanged_run_makes_zero_write_calls(harness: Harness) -> None:
    rows = [person(i) for i in range(25)]
    res = harness.sync(rows)
    assert res["meta"].status == "success", res["meta"].error
    assert res["meta"].counts.adds == 25 and res["meta"].counts.removes == 0
    assert len(harness.audience("meta")) == 25
    assert len(harness.audience("google")) == 25
    calls = {n: d.write_calls for n, d in harness.destinations.items()}
    res = harness.sync(rows)
    assert res["meta"].counts.unchanged == 25
    assert res["meta"].write_calls == 0 and res["google"].write_calls == 0
    assert {n: d.write_calls for n, d in harness.destinations.items()} == calls


def test_payloads_are_hashed_and_platform_specific(harness: Harness) -> None:
    harness.sync([person(1, email="  Mary.Smith+x@GMAIL.com ")])
    (meta_row,) = harness.audience("meta")
    (google_row,) = harness.audience("google")
    meta, google = dict(meta_row), dict(google_row)
    from connector.identifiers.hashing import sha256_hex

    assert meta["EMAIL"] == sha256_hex("mary.smith+x@gmail.com")
    assert google["email"] == sha256_hex("marysmith@gmail.com")  # Gmail rule: Google only
    assert google["country_code"] == "US" and google["postal_code"] == "94107"
    assert meta["PHONE"] == sha256_hex("14155550001")
    assert google["phone"] == sha256_hex("+14155550001")


def test_changes_converge_to_the_segment(harness: Harness, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    rows = [person(i) for i in range(40)]
    harness.sync(rows)
    # 3 leave, 5 join, 4 change their email, 2 change only formatting
    rows = [r for r in rows if r["customer_id"] not in ("C1", "C2", "C3")]
    rows += [person(i) for i in range(100, 105)]
    for r in rows[:4]:
        r["email"] = "new-" + r["email"]
    for r in rows[4:6]:
        r["email"] = "  " + r["email"].upper()
    res = harness.sync(rows)
    c = res["meta"].counts
    assert (c.adds, c.changes, c.removes) == (5, 4, 3), c
    assert c.unchanged == len(rows) - 5 - 4
    for dest in ("meta", "google"):
        assert harness.audience(dest) == fresh_audience(tmp_path_factory.mktemp("o"), rows, dest)
    assert harness.sync(rows)["meta"].write_calls == 0


def test_batches_respect_max_batch_size(harness: Harness) -> None:
    harness.destinations["meta"].capabilities = type(harness.destinations["meta"].capabilities)(max_batch_size=10)
    res = harness.sync([person(i) for i in range(25)])
    assert res["meta"].write_calls == 3  # ceil(25 / 10)
    assert len(harness.audience("meta")) == 25


def test_guardrail_stops_mass_removal_until_forced(harness: Harness) -> None:
    rows = [person(i) for i in range(20)]
    harness.sync(rows)
    before = harness.destinations["meta"].write_calls
    res = harness.sync(rows[:10])
    assert res["meta"].status == "stopped"
    assert "removes 10 of 20" in (res["meta"].error or "")
    assert harness.destinations["meta"].write_calls == before
    assert len(harness.audience("meta")) == 20
    res = harness.sync(rows[:10], force=True)
    assert res["meta"].status == "success"
    assert len(harness.audience("meta")) == 10


def test_guardrail_stops_empty_source(harness: Harness) -> None:
    harness.sync([person(i) for i in range(5)])
    res = harness.sync([])
    assert res["google"].status == "stopped"
    assert "returned 0 rows" in (res["google"].error or "")
    assert len(harness.audience("google")) == 5


def test_add_only_never_removes(make_harness) -> None:  # type: ignore[no-untyped-def]
    h = make_harness(mode='"add_only"')
    rows = [person(i) for i in range(10)]
    h.sync(rows)
    rows2 = [person(i, email=f"changed{i}@example.com") for i in range(2)]
    res = h.sync(rows2)
    assert res["meta"].counts.removes == 0
    assert len(h.audience("meta")) == 12  # 10 originals stay, 2 changed payloads added


def test_bad_rows_are_counted_not_fatal(harness: Harness) -> None:
    rows = [person(i) for i in range(10)]
    rows.append(person(50, email="not-an-email", phone="12"))  # nothing usable but names/zip
    rows.append(person(51, email="", phone="", first_name="", last_name="", zip="", country=""))
    rows.append(person(52, customer_id=""))
    rows.append(person(3))  # duplicate key
    res = harness.sync(rows)
    meta = res["meta"]
    assert meta.status == "success"
    assert meta.counts.invalid_reasons["email_invalid"] >= 1
    assert meta.counts.invalid_reasons["key_missing"] == 1
    assert meta.counts.invalid_reasons["duplicate_key"] == 1
    assert meta.counts.invalid >= 3
    assert len(harness.audience("meta")) == meta.counts.adds


def test_the_first_row_of_a_known_member_wins_even_when_it_is_unusable(harness: Harness) -> None:
    """Like a new member's: a later row with the same key is a duplicate, not a second chance
    (which row counted used to depend on whether the ledger knew the member)."""
    harness.sync([person(i) for i in range(10)])
    empty = person(1, email="", phone="", first_name="", last_name="", zip="", country="")
    write_csv(harness.csv, [person(i) for i in range(10) if i != 1] + [empty, person(10), person(11), person(1)])
    with Engine(harness.settings, destination_factory=harness.factory) as engine:
        res = {r.destination: r for r in engine.sync(None, SyncOptions(force=True))}
    for dest in ("meta", "google"):
        c = res[dest].counts
        assert c.invalid_reasons["duplicate_key"] == 1 and c.invalid_reasons["no_identifier"] == 1
        assert (c.removes, c.adds, c.unchanged) == (1, 2, 9)
        assert len(harness.audience(dest)) == 11


def test_consent_denied_is_not_sent_to_google(harness: Harness) -> None:
    rows = [person(i) for i in range(5)] + [person(9, consent="denied")]
    res = harness.sync(rows)
    assert res["google"].counts.consent_denied == 1
    assert len(harness.audience("google")) == 5
    assert len(harness.audience("meta")) == 6
    # consent withdrawn later: the member is removed from Google
    rows[0]["consent"] = "denied"
    harness.sync(rows)
    assert len(harness.audience("google")) == 4


def test_full_refresh_heals_drift(harness: Harness) -> None:
    rows = [person(i) for i in range(10)]
    harness.sync(rows)
    dest = harness.destinations["meta"]
    aid = next(iter(dest.audiences))
    dest.audiences[aid].rows.pop()
    dest.audiences[aid].rows.add(frozenset({("EMAIL", "0" * 64)}))
    expected = harness.audience("google")
    res = harness.sync(rows, full_refresh=True)
    assert res["meta"].full_refresh and res["meta"].status == "success"
    assert len(harness.audience("meta")) == 10
    assert frozenset({("EMAIL", "0" * 64)}) not in harness.audience("meta")
    assert harness.audience("google") == expected


def test_transient_failures_still_converge(harness: Harness, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    for d in harness.destinations.values():
        d.failure_rate = 0.3
        d.capabilities = type(d.capabilities)(max_batch_size=7)
    rows = [person(i) for i in range(50)]
    res = harness.sync(rows)
    assert res["meta"].status == "success" and res["meta"].retries > 0
    assert harness.audience("meta") == fresh_audience(tmp_path_factory.mktemp("o"), rows, "meta")


def die_on_add(harness: Harness, call: int, *, after_sending: bool) -> object:
    """Meta batches of 10, and the `call`-th add fails like a killed process: before the request
    left, or after the platform took it (its answer lost). Returns the real add_members."""
    dest = harness.destinations["meta"]
    dest.capabilities = type(dest.capabilities)(max_batch_size=10)
    real_add = dest.add_members
    calls = {"n": 0}

    def add(audience, members, session):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == call and not after_sending:
            raise FatalError("simulated crash", code="test")
        out = real_add(audience, members, session)
        if calls["n"] == call:
            raise FatalError("simulated crash after the platform took the batch", code="test")
        return out

    dest.add_members = add  # type: ignore[method-assign]
    return real_add


def test_crash_mid_run_resumes_without_loss(harness: Harness, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    rows = [person(i) for i in range(30)]
    real_add = die_on_add(harness, 2, after_sending=False)
    res = harness.sync(rows)
    assert res["meta"].status == "failed"
    assert len(harness.audience("meta")) == 10  # first batch committed, second lost in flight
    harness.destinations["meta"].add_members = real_add  # type: ignore[method-assign]
    res = harness.sync(rows)
    assert res["meta"].status == "success"
    assert res["meta"].write_calls == 2  # only the 20 members not yet accepted
    assert harness.audience("meta") == fresh_audience(tmp_path_factory.mktemp("o"), rows, "meta")


def test_members_sent_by_a_run_that_died_before_recording_them_are_removed_when_they_leave(
    harness: Harness,
    tmp_path_factory,  # type: ignore[no-untyped-def]
) -> None:
    """New members wait in the plan journal until the platform answers: a run that dies right after
    sending them must not forget them (else one who then leaves the segment stays in the audience)."""
    rows = [person(i) for i in range(25)]
    real_add = die_on_add(harness, 2, after_sending=True)
    assert harness.sync(rows)["meta"].status == "failed"
    assert len(harness.audience("meta")) == 20  # the second batch reached the platform, unrecorded
    harness.destinations["meta"].add_members = real_add  # type: ignore[method-assign]
    # members 15-19 leave: the dead run sent them but recorded nothing
    res = harness.sync(rows[:15] + rows[20:], force=True)
    assert res["meta"].status == "success", res["meta"].error
    assert harness.audience("meta") == fresh_audience(tmp_path_factory.mktemp("o"), rows[:15] + rows[20:], "meta")
    assert harness.sync(rows[:15] + rows[20:])["meta"].write_calls == 0


def test_rejected_members_are_recorded_and_not_resent(harness: Harness) -> None:
    bad = "user3@example.com"
    from connector.identifiers.hashing import sha256_hex

    harness.destinations["meta"].reject_predicate = lambda m: (
        "invalid_entry" if m.payload.get("EMAIL") == sha256_hex(bad) else None
    )
    rows = [person(i) for i in range(6)]
    res = harness.sync(rows)
    assert res["meta"].rejected == 1 and res["meta"].rejected_reasons == {"invalid_entry": 1}
    assert len(harness.audience("meta")) == 5
    assert harness.sync(rows)["meta"].write_calls == 0


def test_dry_run_sends_and_writes_nothing(harness: Harness) -> None:
    rows = [person(i) for i in range(8)]
    res = harness.sync(rows, dry_run=True)
    assert res["meta"].status == "dry_run" and res["meta"].counts.adds == 8
    assert all(d.write_calls == 0 and not d.audiences for d in harness.destinations.values())
    res = harness.sync(rows)
    assert res["meta"].counts.adds == 8


def test_lookalike_created_once_seed_is_big_enough(make_harness) -> None:  # type: ignore[no-untyped-def]
    h = make_harness(**{"lookalike.meta": '{ country = "US", ratio = 0.02, min_seed_size = 5 }'})
    res = h.sync([person(i) for i in range(3)])
    assert res["meta"].lookalike_id is None and "waiting" in (res["meta"].lookalike_state or "")
    res = h.sync([person(i) for i in range(6)])
    first = res["meta"].lookalike_id
    assert first is not None
    res = h.sync([person(i) for i in range(7)])
    assert res["meta"].lookalike_id == first


def test_no_raw_identifier_in_ledger_or_logs(harness: Harness, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("DEBUG")
    rows = [person(i, email=f"secret.person{i}@example.com", last_name="Zyxwvuts") for i in range(5)]
    harness.sync(rows)
    raw = [r["email"] for r in rows] + ["Zyxwvuts", "zyxwvuts", "C1", "secret.person"]
    blob = b"".join(p.read_bytes() for p in (harness.dir / "state").rglob("*") if p.is_file())
    for value in raw:
        assert value.encode() not in blob
        assert value not in caplog.text


def test_member_whose_key_ends_in_a_zero_byte_is_removed(harness: Harness) -> None:
    from connector.identifiers.hashing import member_key

    # numpy's fixed-width bytes drop trailing NULs: such a key must still be removable
    i = next(i for i in range(100_000) if member_key(f"C{i}")[30:32] == "00")
    rows = [person(j) for j in range(10)] + [person(i)]
    harness.sync(rows)
    res = harness.sync(rows[:10])
    assert res["meta"].counts.removes == 1
    assert len(harness.audience("meta")) == 10


def test_google_members_are_resent_before_their_membership_expires(harness: Harness) -> None:
    """A membership lasts `membership_days` from when Google accepted it: members whose acceptance is
    older than membership_days - resend_before_expiry_days are sent again, once."""
    import sqlite3
    from datetime import UTC, datetime, timedelta

    google = harness.destinations["google"]
    google.capabilities = type(google.capabilities)(max_batch_size=2)
    rows = [person(i) for i in range(4)]
    harness.sync(rows)
    con = sqlite3.connect(harness.dir / "state" / "ledger.db")
    # the first batch (2 members) was accepted 512 days ago: 28 days of its 540 are left (< 30)
    old = (datetime.now(UTC) - timedelta(days=512)).replace(tzinfo=None).isoformat(sep=" ")
    assert con.execute("UPDATE batches SET acked_at = ? WHERE destination = 'google' AND seq = 0", (old,)).rowcount == 1
    con.commit()
    con.close()
    before = google.write_calls
    res = harness.sync(rows)
    assert res["google"].counts.resends == 2 and res["google"].as_dict()["adds"] == 2
    assert res["google"].write_calls == 1 and google.write_calls == before + 1
    assert res["meta"].write_calls == 0
    assert harness.sync(rows)["google"].write_calls == 0  # re-sent once, with a new acceptance time


def test_duplicate_keys_with_a_destination_added_later(make_harness) -> None:  # type: ignore[no-untyped-def]
    from conftest import write_csv

    from connector.engine import SyncOptions

    h = make_harness()
    rows = [person(i) for i in range(5)]
    write_csv(h.csv, rows)
    with h.engine() as engine:  # only meta first: google's ledger knows nobody yet
        engine.sync(None, SyncOptions(destinations=frozenset({"meta"})))
    write_csv(h.csv, [*rows, person(2)])
    res = h.sync()
    assert res["google"].status == "success", res["google"].error
    assert res["google"].counts.invalid_reasons["duplicate_key"] == 1
    assert res["meta"].counts.invalid_reasons["duplicate_key"] == 1
    assert len(h.audience("google")) == 5


def test_two_members_sending_the_same_payload_keep_it_until_both_leave(harness: Harness) -> None:
    """Two customers with every identifier in common are one user to the platform: when one leaves,
    removing the shared payload would take the other out too."""
    twins = [person(1, email="family@example.com", phone="+14155550100"),
             person(2, email="family@example.com", phone="+14155550100")]  # fmt: skip
    harness.sync([*twins, person(3)])
    assert len(harness.audience("meta")) == 2
    res = harness.sync([twins[0], person(3)], force=True)  # 1 of 3 is over the 20% guardrail
    assert res["meta"].counts.removes == 1 and res["meta"].status == "success"
    assert len(harness.audience("meta")) == 2 and len(harness.audience("google")) == 2  # the twin stays
    assert harness.sync([twins[0], person(3)])["meta"].write_calls == 0
    harness.sync([person(3)], force=True)
    assert len(harness.audience("meta")) == 1 and len(harness.audience("google")) == 1


def test_an_audience_deleted_on_the_platform_is_recreated_and_filled_again(harness: Harness) -> None:
    rows = [person(i) for i in range(12)]
    harness.sync(rows)
    meta = harness.destinations["meta"]
    meta.audiences.clear()  # deleted in Ads Manager
    res = harness.sync(rows)
    assert res["meta"].audience_recreated and res["meta"].as_dict()["audience_recreated"] is True
    assert res["meta"].counts.adds == 12 and res["meta"].status == "success", res["meta"]
    assert len(harness.audience("meta")) == 12
    assert not res["google"].audience_recreated and res["google"].write_calls == 0
    assert harness.sync(rows)["meta"].write_calls == 0


class Wire:
    """Counts the members that went over the wire, per kind, for one destination."""

    def __init__(self, dest: object) -> None:
        self.adds = self.removes = 0
        real_add, real_remove = dest.add_members, dest.remove_members  # type: ignore[attr-defined]

        def add(audience, members, session):  # type: ignore[no-untyped-def]
            self.adds += len(members)
            return real_add(audience, members, session)

        def remove(audience, members, session):  # type: ignore[no-untyped-def]
            self.removes += len(members)
            return real_remove(audience, members, session)

        dest.add_members, dest.remove_members = add, remove  # type: ignore[attr-defined]


def test_consent_changes_are_sent_and_every_count_is_what_went_on_the_wire(harness: Harness) -> None:
    rows = [person(i) for i in range(10)]
    harness.sync(rows)
    wire = {d: Wire(harness.destinations[d]) for d in ("meta", "google")}
    rows[0]["consent"] = "denied"  # ad_user_data denied: Google must drop the member
    rows[1]["email"] = "new1@example.com"  # an identifier change
    rows = rows[:9]  # one leaves
    res = harness.sync(rows, force=True)
    g = res["google"].as_dict()
    assert (g["left_segment"], g["identifier_changes"], g["consent_denied"]) == (2, 1, 1), g
    assert (wire["google"].adds, wire["google"].removes) == (g["adds"], g["removes"]) == (1, 3)
    m = res["meta"].as_dict()
    assert (wire["meta"].adds, wire["meta"].removes) == (m["adds"], m["removes"]) == (1, 2)
    google = harness.audience("google")
    assert len(google) == 8
    rows[0]["consent"] = "granted"  # granted again: added back
    res = harness.sync(rows)
    assert res["google"].counts.adds == 1 and wire["google"].adds == 2 and res["meta"].write_calls == 0
    assert len(harness.audience("google")) == 9


def test_a_consent_only_change_sends_the_member_again_with_its_new_consent(make_harness) -> None:  # type: ignore[no-untyped-def]
    h = make_harness()
    text = (
        (h.dir / "connector.toml")
        .read_text()
        .replace(
            'consent = { ad_user_data_column = "consent" }',
            'consent = { ad_user_data_column = "consent", ad_personalization_column = "pers" }',
        )
    )
    (h.dir / "connector.toml").write_text(text)
    import conftest

    fields = [*conftest.FIELDS, "pers"]
    rows = [{**person(i), "pers": "granted"} for i in range(5)]

    def write(rs: list[dict[str, str]]) -> None:
        import csv

        with h.csv.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rs)

    write(rows)
    h.sync()
    sent: list[object] = []
    real = h.destinations["google"].add_members

    def add(audience, members, session):  # type: ignore[no-untyped-def]
        sent.extend(members)
        return real(audience, members, session)

    h.destinations["google"].add_members = add  # type: ignore[method-assign]
    rows[3]["pers"] = "denied"
    write(rows)
    res = h.sync()
    assert res["google"].counts.consent_changes == 1 and res["google"].write_calls == 1
    assert res["meta"].write_calls == 0  # Meta has no per-member consent
    (member,) = sent
    assert member.consent.ad_personalization is False and member.consent.ad_user_data is True  # type: ignore[attr-defined]
    assert h.sync()["google"].write_calls == 0


def test_a_key_twice_among_unchanged_rows_is_a_duplicate(harness: Harness) -> None:
    """A warm run counts its unchanged rows without taking them out one by one: a known member's row
    there twice, unchanged both times, is still found; so is a new member's row there twice."""
    rows = [person(i) for i in range(10)]
    harness.sync(rows)
    for extra, adds in (([person(3)], 0), ([person(20), person(20)], 1)):
        res = harness.sync([*rows, *extra])
        for dest in ("meta", "google"):
            c = res[dest].counts
            assert c.invalid_reasons["duplicate_key"] == 1, c
            assert (c.source_rows, c.unchanged, c.adds, c.removes) == (10 + len(extra), 10, adds, 0), c
            assert len(harness.audience(dest)) == 10 + adds


def _states_read_back(h: Harness, dest: str) -> dict[str, int]:
    """The pair's members by state, from a read of all its rows."""
    import duckdb

    from connector.identifiers.normalize import Normalizer
    from connector.ledger.files import PairFiles, member_root, member_schema
    from connector.ledger.journal import Journal
    from connector.ledger.recovery import current_sql, register_journal, resolved_sql, state_histogram, state_names

    seg = h.settings.segments["vip"]
    keys = Normalizer(dest, list(seg.identifiers), seg.default_region).schema()
    journal, con = Journal(h.settings.ledger_sqlalchemy_url()), duckdb.connect()
    try:
        current = current_sql(PairFiles(member_root(h.settings), "vip", dest), journal.pointer("vip", dest),
                              member_schema(keys))  # fmt: skip
        assert current is not None
        # the histogram itself: the test below counts calls of `state_counts`, the settling's full read
        return state_names(state_histogram(con, resolved_sql(current, *register_journal(con, journal, "vip", dest, "t"))))
    finally:
        con.close()
        journal.close()


def test_the_counts_a_run_records_are_its_members_states(harness: Harness, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """After a warm run the pair's counts come from its plan and the acknowledgements, not from reading
    every member again; they equal such a read, run after run (the destinations' members differ in
    state: Meta refuses one of them)."""
    import connector.ledger.recovery as recovery_module
    from connector.identifiers.hashing import sha256_hex
    from connector.ledger.journal import Journal

    harness.destinations["meta"].reject_predicate = lambda m: (
        "invalid_entry" if m.payload.get("EMAIL") in (sha256_hex("user3@example.com"), sha256_hex("new5@example.com"))
        else None
    )  # fmt: skip
    rows = [person(i) for i in range(12)]
    harness.sync(rows)
    full_reads = []
    monkeypatch.setattr(recovery_module, "state_counts", lambda *a: full_reads.append(a) or {})
    steps = [
        rows,
        [*rows[1:], person(30)],  # one leaves, one joins
        [person(3, email="fixed3@example.com"), person(5, email="new5@example.com"), *rows[6:], person(31)],
        [person(3, email="fixed3@example.com"), person(5, email="new5@example.com"), *rows[6:]],  # one leaves
    ]
    journal = Journal(harness.settings.ledger_sqlalchemy_url())
    try:
        for step in steps:
            res = harness.sync(step, force=True)
            assert all(r.status == "success" for r in res.values()), res
            assert not full_reads  # no pair was read again to count it
            for dest in ("meta", "google"):
                assert journal.counts("vip", dest) == _states_read_back(harness, dest), dest
        assert journal.counts("vip", "meta") == {"confirmed": 7, "rejected": 1}
        assert journal.counts("vip", "google") == {"confirmed": 8}
    finally:
        journal.close()


def test_counts_while_google_has_not_confirmed_earlier_requests(harness: Harness) -> None:
    """Members of a request Google confirms (or fails) between planning and settling change state
    without this run rewriting them: the counts still equal a read of every member."""
    from dataclasses import replace

    from connector.destinations.base import RequestOutcome
    from connector.ledger.journal import Journal

    google = harness.destinations["google"]
    real_add = google.add_members
    answers: list[str] = []  # what each reconcile call says about every request, in order
    google.add_members = lambda a, m, s: replace(real_add(a, m, s), pending=True)  # type: ignore[method-assign]
    google.reconcile = lambda a, ids: {r: RequestOutcome(answers.pop(0) if answers else "pending") for r in ids}  # type: ignore[method-assign]
    rows = [person(i) for i in range(10)]
    journal = Journal(harness.settings.ledger_sqlalchemy_url())
    try:
        harness.sync(rows)
        assert journal.counts("vip", "google") == {"accepted": 10}
        answers[:] = ["pending", "succeeded"]  # still running when the run starts, done when it settles
        harness.sync([*rows[1:], person(20)], force=True)
        assert journal.counts("vip", "google") == _states_read_back(harness, "google") == {"confirmed": 9, "accepted": 1}
        answers[:] = ["pending", "failed"]
        harness.sync([*rows[1:], person(20)])
        assert journal.counts("vip", "google") == _states_read_back(harness, "google") == {"confirmed": 9, "planned": 1}
    finally:
        journal.close()


def test_members_written_without_the_whole_fingerprint_are_found_by_key(harness: Harness) -> None:
    """A warm run meets rows and members by fingerprint; members whose files hold no `fq` (written before
    the fingerprint had it, or converted from an older ledger with no fingerprint at all) are met by key
    instead: nothing is sent, and the run writes their fingerprints for the next one."""
    import pyarrow.parquet as pq

    rows = [person(i) for i in range(10)]
    harness.sync(rows)
    bases = sorted((harness.dir / "state").rglob("base-*.parquet"))
    assert len(bases) == 2
    for i, path in enumerate(bases):
        table = pq.read_table(path).drop_columns(["fq"])
        if i:
            table = table.set_column(table.schema.get_field_index("fp"), "fp", pa.nulls(len(table), pa.uint64()))
        pq.write_table(table, path)
    before = {dest: harness.audience(dest) for dest in ("meta", "google")}
    for _ in range(2):
        res = harness.sync(rows)
        for dest in ("meta", "google"):
            c = res[dest].counts
            assert (c.adds, c.removes, c.changes, c.unchanged) == (0, 0, 0, 10), c
            assert res[dest].write_calls == 0
            assert harness.audience(dest) == before[dest]


def test_a_segments_destinations_are_sent_to_at_once(harness: Harness) -> None:
    both_in_a_call = threading.Barrier(2, timeout=10)  # sent one after the other, the first call waits in vain
    for dest in harness.destinations.values():
        add = dest.add_members

        def waiting(audience: Any, members: Any, session: Any, add: Any = add) -> Any:
            both_in_a_call.wait()
            return add(audience, members, session)

        dest.add_members = waiting  # type: ignore[method-assign]
    res = harness.sync([person(i) for i in range(20)])
    assert [(r.status, r.write_calls) for r in res.values()] == [("success", 1), ("success", 1)]
    assert len(harness.audience("meta")) == 20 and len(harness.audience("google")) == 20
