"""Google Ads API path with the official google-ads client against the gRPC (TLS) emulator."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from google.auth.credentials import AnonymousCredentials

from connector.destinations.base import Consent, Member
from connector.destinations.google.ads_client import GoogleAdsApi
from connector.errors import FatalError
from connector.identifiers.hashing import sha256_hex
from connector.retry import RetryPolicy
from connector.sandbox.google_ads import GoogleAdsEmulator

TOKEN = "dev-token-for-tests"


@pytest.fixture(scope="module")
def emu() -> Iterator[GoogleAdsEmulator]:
    with GoogleAdsEmulator(developer_token=TOKEN) as e:
        yield e


def api(emu: GoogleAdsEmulator, token: str = TOKEN) -> GoogleAdsApi:
    return GoogleAdsApi(customer_id="1234567890", login_customer_id=None, developer_token=token,
                        credentials=AnonymousCredentials(), endpoint=emu.endpoint, timeout=10,
                        policy=RetryPolicy(max_attempts=10, backoff_base_seconds=0.0, sleep=lambda _s: None))  # fmt: skip


def member(i: int, email: str | None = None, consent: Consent | None = None) -> Member:
    return Member(f"k{i}", {"email": email or sha256_hex(f"u{i}@x.com"), "phone": sha256_hex(f"+1415{i:07d}")}, consent)


def test_list_once_jobs_and_partial_failures(emu: GoogleAdsEmulator) -> None:
    a = api(emu)
    lid = a.ensure_crm_list("ads-vip", None, 30)
    assert a.ensure_crm_list("ads-vip", None, 30) == lid  # found by name
    out = a.stage(lid, [member(1), member(2, email="NOT-HEX"), member(3, consent=Consent(False, True))], remove=False)
    assert out.pending and out.request_id
    assert out.rejected == {"k2": "google_ads: INVALID_SHA256_FORMAT",
                            "k3": "google_ads: CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS"}  # fmt: skip
    assert a.job_outcome(out.request_id).state == "pending"  # staged, not run yet, still open here
    a.run_staged(lid)
    assert a.job_outcome(out.request_id).state == "succeeded"
    assert emu.members(lid) == {frozenset({("email", sha256_hex("u1@x.com")), ("phone", sha256_hex("+14150000001"))})}
    # a job staged by a process that died before running it is reported failed: members are re-sent
    orphan = api(emu).stage(lid, [member(4)], remove=False).request_id or ""
    assert api(emu).job_outcome(orphan).state == "failed"


def test_adds_and_removes_never_share_a_job(emu: GoogleAdsEmulator) -> None:
    a = api(emu)
    lid = a.ensure_crm_list("ads-mixed", None, 30)
    first = a.stage(lid, [member(1), member(2)], remove=False).request_id
    a.run_staged(lid)
    add_job = a.stage(lid, [member(3)], remove=False).request_id
    remove_job = a.stage(lid, [member(1)], remove=True).request_id  # switching kind runs the open job first
    a.run_staged(lid)
    assert len({first, add_job, remove_job}) == 3
    assert {dict(r)["email"] for r in emu.members(lid)} == {sha256_hex("u2@x.com"), sha256_hex("u3@x.com")}


def test_parallel_calls_on_one_job_are_concurrent_modification(emu: GoogleAdsEmulator) -> None:
    a = api(emu)
    lid = a.ensure_crm_list("ads-parallel", None, 30)
    job = a._create_job(lid)
    errors: list[str] = []
    raw = GoogleAdsApi(customer_id="1234567890", login_customer_id=None, developer_token=TOKEN,
                       credentials=AnonymousCredentials(), endpoint=emu.endpoint, timeout=10,
                       policy=RetryPolicy(max_attempts=1))  # fmt: skip

    def call(i: int) -> None:
        from connector.destinations.google.ads_client import _OpenJob

        try:
            raw._add_ops(_OpenJob(job, False), [member(i)], [raw._user_data(member(i))], remove=False)
        except Exception as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any("CONCURRENT_MODIFICATION" in e for e in errors)


def test_allowlist_developer_token_and_lookalike(emu: GoogleAdsEmulator) -> None:
    a = api(emu)
    seed = a.ensure_crm_list("ads-seed", None, 30)
    a.stage(seed, [member(i) for i in range(5)], remove=False)
    a.run_staged(seed)
    spec = {"expansion_level": "NARROW", "country_codes": ["US"], "min_seed_size": 6}
    assert a.ensure_lookalike(seed, "lal-seed", spec, None, seed_size=5) is None
    spec["min_seed_size"] = 5
    first = a.ensure_lookalike(seed, "lal-seed", spec, None, seed_size=5)
    assert first is not None
    again = a.ensure_lookalike(seed, "lal-seed", spec, None, seed_size=5)  # ledger lost it: found by name
    assert again is not None and again.lookalike_id == first.lookalike_id
    with pytest.raises(FatalError, match="DEVELOPER_TOKEN_NOT_APPROVED"):
        api(emu, token="wrong").find_list("x")
    emu.allowlisted = False
    try:
        with pytest.raises(FatalError, match='upload_api = "datamanager"'):
            a.stage(a.ensure_crm_list("ads-closed", None, 30), [member(1)], remove=False)
    finally:
        emu.allowlisted = True
    assert not any(TOKEN in str(entry) for entry in emu.request_log)


def test_jobs_a_killed_process_filled_but_never_ran_are_run_by_the_next_one(emu: GoogleAdsEmulator) -> None:
    """The ledger records staged removals when `stage` returns; a process killed before `finish` never
    runs the job. The next process finds the job PENDING on the list and runs it, oldest first."""
    a = api(emu)
    lid = a.ensure_crm_list("ads-resume", None, 30)
    a.stage(lid, [member(1), member(2), member(3)], remove=False)
    a.run_staged(lid)
    emu.processing_delay_seconds = 0.0
    assert len(emu.members(lid)) == 3
    dead = api(emu)  # stages a removal, then "dies": its job is never run
    dead.stage(lid, [member(1)], remove=True)
    other = api(emu).ensure_crm_list("ads-other", None, 30)
    api(emu).stage(other, [member(9)], remove=False)  # another list's pending job: not ours to run
    assert len(emu.members(lid)) == 3
    nxt = api(emu)
    resumed = nxt.resume_pending_jobs(lid)
    assert len(resumed) == 1 and nxt.job_outcome(resumed[0]).state == "succeeded"
    assert len(emu.members(lid)) == 2 and emu.members(other) == set()
    assert nxt.resume_pending_jobs(lid) == []


def test_a_list_removed_in_google_ads_is_replaced_by_a_new_empty_one(emu: GoogleAdsEmulator) -> None:
    a = api(emu)
    lid = a.ensure_crm_list("ads-removed", None, 30)
    emu.delete_audience(lid)
    assert a.user_list_status(lid).state == "missing"
    again = a.ensure_crm_list("ads-removed", lid, 30)
    assert again != lid and emu.members(again) == set()


def test_values_go_as_lifetime_value_in_attribute_jobs_and_removals_in_plain_ones(emu: GoogleAdsEmulator) -> None:
    a = api(emu)
    lid = a.ensure_crm_list("ads-ltv", None, 30)
    people = [Member(f"k{i}", member(i).payload, value=v) for i, v in enumerate([12.5, None, 0.000001, 1e12])]
    out = a.stage(lid, people, remove=False, attributes=True)
    assert out.rejected == {}
    a.run_staged(lid)
    assert emu.jobs[out.request_id or ""]["type"] == 5  # CUSTOMER_MATCH_WITH_ATTRIBUTES
    key = lambda i: frozenset(member(i).payload.items())  # noqa: E731
    assert emu.values(lid) == {key(0): 12_500_000, key(2): 1, key(3): 10**18}  # micros; k1 sent without a value
    assert len(emu.members(lid)) == 4
    gone = a.stage(lid, people[:1], remove=True, attributes=True)  # removals never carry attributes
    a.run_staged(lid)
    assert emu.jobs[gone.request_id or ""]["type"] == 4 and emu.values(lid) == {key(2): 1, key(3): 10**18}
    # a value in a plain list job is refused by the platform: the connector never sends one there
    plain = a.stage(lid, [Member("k9", member(9).payload, value=5.0)], remove=False)
    a.run_staged(lid)
    assert plain.rejected == {} and emu.values(lid).get(key(9)) is None and key(9) in emu.members(lid)
