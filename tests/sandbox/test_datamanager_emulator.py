"""The Data Manager emulator refuses what the Data Manager API refuses, in Google's error shape, and
behaves like it over time: consent per member, FAILED requests, deleted lists, membership expiry.

Bodies are written as the official REST client sends them (camelCase JSON, enums as numbers)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.ads import datamanager_v1 as dm
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import BadRequest
from google.auth.credentials import AnonymousCredentials

from connector.clock import FakeClock
from connector.identifiers.hashing import sha256_hex
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.google_datamanager import TERMS_URL, DataManagerEmulator

ACCOUNT = "1234567890"
ACCEPTED = {"customerMatchTermsOfServiceStatus": 1}
GRANTED, DENIED = 1, 2


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Iterator[DataManagerEmulator]:
    with DataManagerEmulator(clock=clock) as e:
        yield e


@pytest.fixture
def http(emu: DataManagerEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emu.url, timeout=30) as c:
        yield c


def new_list(http: httpx.Client, name: str = "vip", days: int = 540) -> str:
    r = http.post(f"/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists",
                  json={"displayName": name, "membershipDuration": f"{days * 86400}s"})  # fmt: skip
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def dest(lid: str) -> list[dict[str, Any]]:
    return [{"operatingAccount": {"accountType": 1, "accountId": ACCOUNT}, "productDestinationId": lid}]


def person(i: int, **consent: int) -> dict[str, Any]:
    m: dict[str, Any] = {"userData": {"userIdentifiers": [{"emailAddress": sha256_hex(f"u{i}@x.com")},
                                                          {"phoneNumber": sha256_hex(f"+1415555{i:04d}")}]}}  # fmt: skip
    if consent:
        m["consent"] = consent
    return m


def key(i: int) -> frozenset[tuple[str, str]]:
    return frozenset({("email", sha256_hex(f"u{i}@x.com")), ("phone", sha256_hex(f"+1415555{i:04d}"))})


def ingest(http: httpx.Client, lid: str, members: list[dict[str, Any]], **over: Any) -> httpx.Response:
    body = {"destinations": dest(lid), "audienceMembers": members, "encoding": 1, "termsOfService": ACCEPTED, **over}
    return http.post("/v1/audienceMembers:ingest", json={k: v for k, v in body.items() if v is not None})


def status(http: httpx.Client, rid: str) -> dict[str, Any]:
    r = http.get("/v1/requestStatus:retrieve", params={"requestId": rid})
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()["requestStatusPerDestination"][0]
    return doc


def refused(r: httpx.Response, code: int = 400) -> dict[str, Any]:
    assert r.status_code == code, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code and err["status"] == {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}[code]
    return err


def violation(err: dict[str, Any]) -> str:
    (detail,) = err["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    (v,) = detail["fieldViolations"]
    return str(v["field"])


# ---------------------------------------------------------------------------- refusals


def test_an_ingest_without_the_customer_match_terms_is_refused(http: httpx.Client, emu: DataManagerEmulator) -> None:
    lid = new_list(http)
    for terms in (None, {"customerMatchTermsOfServiceStatus": 2}, {}):  # missing, REJECTED, unset
        err = refused(ingest(http, lid, [person(1)], termsOfService=terms))
        assert TERMS_URL in err["message"] and "must be ACCEPTED" in err["message"]
        assert violation(err) == "terms_of_service.customer_match_terms_of_service_status"
    assert emu.members(lid) == set()
    assert ingest(http, lid, [person(1)]).status_code == 200  # the same request with the terms accepted
    # removals need no terms
    r = http.post("/v1/audienceMembers:remove", json={"destinations": dest(lid), "audienceMembers": [person(1)],
                                                      "encoding": 1})  # fmt: skip
    assert r.status_code == 200 and emu.members(lid) == set()


@pytest.mark.parametrize(("body", "field", "needle"), [
    ({"encodingg": 1}, "", 'Unknown name "encodingg"'),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"emailAddress": sha256_hex("a")}]}, "weight": 2}]},
     "audience_members[0]", 'Unknown name "weight"'),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"email": sha256_hex("a")}]}}]},
     "audience_members[0].user_data.user_identifiers[0]", 'Unknown name "email"'),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"emailAddress": sha256_hex("a"),
                                                              "phoneNumber": sha256_hex("b")}]}}]},
     "audience_members[0].user_data.user_identifiers[0]", "oneof field 'identifier' is already set"),
    ({"consent": {"adUserData": "MAYBE"}}, "consent.ad_user_data", "not a valid enum value"),
    ({"encoding": None}, "encoding", "encoding is required for hashed user data"),
    ({"destinations": None}, "destinations", "destinations is required"),
    ({"audienceMembers": []}, "audience_members", "audience_members is required"),
    ({"audienceMembers": [{"userData": {"userIdentifiers": []}}]},
     "audience_members[0].user_data.user_identifiers", "user_identifiers is required"),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"emailAddress": sha256_hex("a").upper()}]}}]},
     "audience_members[0].user_data.user_identifiers[0].email_address", "INVALID_SHA256_FORMAT"),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"phoneNumber": "+14155550100"}]}}]},
     "audience_members[0].user_data.user_identifiers[0].phone_number", "64 lowercase hex"),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"emailAddress": sha256_hex("a")},
                                                            {"phoneNumber": sha256_hex("b") + "\n"}]}}]},
     "audience_members[0].user_data.user_identifiers[1].phone_number", "64 lowercase hex"),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"address": {"givenName": sha256_hex("mary"),
                                                                          "regionCode": "US", "postalCode": "94107"}}]}}]},
     "audience_members[0].user_data.user_identifiers[0].address", "all required for an address match"),
    ({"audienceMembers": [{"userData": {"userIdentifiers": [{"emailAddress": sha256_hex(str(i))} for i in range(11)]}}]},
     "audience_members[0].user_data.user_identifiers", "at most 10 user identifiers"),
])  # fmt: skip
def test_requests_the_api_refuses_are_refused(http: httpx.Client, emu: DataManagerEmulator, body: dict[str, Any],
                                              field: str, needle: str) -> None:  # fmt: skip
    lid = new_list(http)
    r = ingest(http, lid, body.pop("audienceMembers", [person(1)]), **body)
    err = refused(r)
    assert needle in err["message"]
    assert violation(err) == field
    assert emu.members(lid) == set()


def test_at_most_10000_members_a_request(http: httpx.Client, emu: DataManagerEmulator) -> None:
    lid = new_list(http)
    err = refused(ingest(http, lid, [person(i) for i in range(10_001)]))
    assert "at most 10000 per request, got 10001" in err["message"] and violation(err) == "audience_members"
    assert ingest(http, lid, [person(i) for i in range(10_000)]).status_code == 200
    assert len(emu.members(lid)) == 10_000


def test_the_destination_list_must_exist_for_the_operating_account(http: httpx.Client) -> None:
    lid = new_list(http)
    assert "not found" in refused(ingest(http, "123", [person(1)]), 404)["message"]
    other = [{"operatingAccount": {"accountType": 1, "accountId": "999"}, "productDestinationId": lid}]
    refused(ingest(http, lid, [person(1)], destinations=other), 404)
    r = http.post(f"/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists", json={"displayName": "x", "size": 3})
    assert 'Unknown name "size"' in refused(r)["message"]


def test_the_official_client_is_refused_without_terms_and_accepted_with_them(emu: DataManagerEmulator,
                                                                              http: httpx.Client) -> None:  # fmt: skip
    lid = new_list(http)
    client = dm.IngestionServiceClient(credentials=AnonymousCredentials(), transport="rest",
                                       client_options=ClientOptions(api_endpoint=emu.url))  # fmt: skip
    target = dm.Destination(operating_account=dm.ProductAccount(account_type=1, account_id=ACCOUNT),
                            product_destination_id=lid)  # fmt: skip
    one = dm.AudienceMember(user_data=dm.UserData(user_identifiers=[dm.UserIdentifier(email_address=sha256_hex("a"))]))
    request = dm.IngestAudienceMembersRequest(destinations=[target], audience_members=[one], encoding=dm.Encoding.HEX)
    with pytest.raises(BadRequest, match="customer_match_terms_of_service_status must be ACCEPTED"):
        client.ingest_audience_members(request=request)
    request.terms_of_service = dm.TermsOfService(customer_match_terms_of_service_status=dm.TermsOfServiceStatus.ACCEPTED)
    assert client.ingest_audience_members(request=request).request_id
    assert emu.members(lid) == {frozenset({("email", sha256_hex("a"))})}


def test_base64_hashes_are_accepted_when_declared(http: httpx.Client, emu: DataManagerEmulator) -> None:
    lid = new_list(http)
    b64 = base64.b64encode(bytes.fromhex(sha256_hex("a"))).decode()
    member = {"userData": {"userIdentifiers": [{"emailAddress": b64}]}}
    assert "INVALID_SHA256_FORMAT" in refused(ingest(http, lid, [member]))["message"]  # declared HEX
    assert ingest(http, lid, [member], encoding=2).status_code == 200
    assert emu.members(lid) == {frozenset({("email", sha256_hex("a"))})}


def test_validate_only_checks_without_applying(http: httpx.Client, emu: DataManagerEmulator) -> None:
    lid = new_list(http)
    assert ingest(http, lid, [person(1)], validateOnly=True).json() == {}
    refused(ingest(http, lid, [person(1)], validateOnly=True, termsOfService=None))
    assert emu.members(lid) == set()


# ---------------------------------------------------------------------------- consent per member


def test_consent_is_stored_per_member_and_denied_ad_user_data_is_not_ingested(http: httpx.Client,
                                                                              emu: DataManagerEmulator) -> None:  # fmt: skip
    lid = new_list(http)
    members = [person(1), person(2, adPersonalization=DENIED), person(3, adUserData=DENIED), person(4, adUserData=GRANTED)]
    rid = ingest(http, lid, members, consent={"adUserData": GRANTED, "adPersonalization": GRANTED}).json()["requestId"]
    assert emu.member_consent(lid) == {key(1): ("GRANTED", "GRANTED"), key(2): ("GRANTED", "DENIED"),
                                       key(4): ("GRANTED", "GRANTED")}  # fmt: skip
    st = status(http, rid)
    assert st["requestStatus"] == "PARTIAL_SUCCESS"
    assert st["errorInfo"]["errorCounts"] == [{"recordCount": "1", "reason": "PROCESSING_ERROR_REASON_DENIED_CONSENT"}]
    # a consent change alone is a new ingest of the member: the list keeps the latest consent
    ingest(http, lid, [person(2, adUserData=GRANTED, adPersonalization=GRANTED)])
    assert emu.member_consent(lid)[key(2)] == ("GRANTED", "GRANTED")
    ingest(http, lid, [person(1)])  # no consent at all: unspecified, as sent
    assert emu.member_consent(lid)[key(1)] == ("UNSPECIFIED", "UNSPECIFIED")


# ---------------------------------------------------------------------------- faults and time


def test_request_status_is_processing_until_the_clock_passes_the_delay(http: httpx.Client, emu: DataManagerEmulator,
                                                                       clock: FakeClock) -> None:  # fmt: skip
    emu.processing_delay_seconds = 300
    lid = new_list(http)
    rid = ingest(http, lid, [person(1)]).json()["requestId"]
    assert status(http, rid)["requestStatus"] == "PROCESSING"
    clock.advance(299)
    assert status(http, rid)["requestStatus"] == "PROCESSING"
    clock.advance(1)
    st = status(http, rid)
    assert st["requestStatus"] == "SUCCESS" and st["audienceMembersIngestionStatus"] == {
        "userDataIngestionStatus": {"recordCount": "1"}}  # fmt: skip


def test_a_failed_request_applies_nothing(http: httpx.Client, emu: DataManagerEmulator) -> None:
    lid = new_list(http)
    ingest(http, lid, [person(1)])
    emu.faults.failed_request_rate = 1.0
    rid = ingest(http, lid, [person(2), person(3)]).json()["requestId"]
    remove = http.post("/v1/audienceMembers:remove", json={"destinations": dest(lid), "audienceMembers": [person(1)],
                                                           "encoding": 1}).json()["requestId"]  # fmt: skip
    st = status(http, rid)
    assert st["requestStatus"] == "FAILED"
    assert st["errorInfo"]["errorCounts"] == [{"recordCount": "2", "reason": "PROCESSING_ERROR_REASON_INTERNAL_ERROR"}]
    assert status(http, remove)["requestStatus"] == "FAILED"
    assert emu.members(lid) == {key(1)} and emu.faults.injected["failed_request"] == 2


def test_a_list_deleted_on_the_platform_is_gone(http: httpx.Client, emu: DataManagerEmulator) -> None:
    lid = new_list(http)
    ingest(http, lid, [person(1)])
    path = f"/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists/{lid}"
    assert http.delete(path).status_code == 200
    refused(http.get(path), 404)
    refused(ingest(http, lid, [person(1)]), 404)
    assert http.get(f"/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists").json() == {"userLists": []}
    assert new_list(http) != lid  # a new list never reuses the id


def test_lists_can_be_deleted_between_runs(tmp_path: Path) -> None:
    state = tmp_path / "dm.json"
    with DataManagerEmulator(state_file=state) as e, httpx.Client(base_url=e.url) as http:
        first, second = new_list(http, "a"), new_list(http, "b")
        ingest(http, first, [person(1)])
    with DataManagerEmulator(state_file=state) as e:
        assert e.member_count(first) == 1 and e.member_count(second) == 0
    with DataManagerEmulator(state_file=state, faults=FaultKnobs(audience_deletion_rate=1.0)) as e:
        assert e.lists == {} and e.faults.injected == {"audience_deleted": 2}
    with DataManagerEmulator(state_file=state) as e:
        assert e.member_count(first) is None and e.member_count(second) is None


def test_members_expire_after_the_membership_duration(http: httpx.Client, emu: DataManagerEmulator,
                                                      clock: FakeClock) -> None:  # fmt: skip
    lid = new_list(http, days=30)
    ingest(http, lid, [person(1), person(2)])
    clock.advance(days=20)
    ingest(http, lid, [person(2)])  # re-ingested: its membership starts again
    clock.advance(days=10, seconds=1)
    assert emu.members(lid) == {key(2)}
    path = f"/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists/{lid}"
    assert http.get(path).json()["sizeInfo"]["searchNetworkMembersCount"] == "1"
    clock.advance(days=20)
    assert emu.members(lid) == set()
    assert new_list(http, "too-long", days=540) and refused(
        http.post(f"/v1/accountTypes/GOOGLE_ADS/accounts/{ACCOUNT}/userLists",
                  json={"displayName": "x", "membershipDuration": f"{541 * 86400}s"}))  # fmt: skip


def test_remove_all_removes_what_was_ingested_before_the_cutoff(http: httpx.Client, emu: DataManagerEmulator,
                                                                clock: FakeClock) -> None:  # fmt: skip
    lid = new_list(http)
    ingest(http, lid, [person(1)])
    clock.advance(10)
    cutoff = clock.now()
    clock.advance(10)
    ingest(http, lid, [person(2)])
    stamp = cutoff.strftime("%Y-%m-%dT%H:%M:%SZ")
    r = http.post("/v1/audienceMembers:removeAll", json={"destinations": dest(lid), "removeAsOfTime": stamp})
    assert r.status_code == 200 and emu.members(lid) == {key(2)}


def test_state_survives_restarts_with_consent_and_ingest_times(tmp_path: Path) -> None:
    state, clock = tmp_path / "dm.json", FakeClock()
    with DataManagerEmulator(state_file=state, clock=clock) as e, httpx.Client(base_url=e.url) as http:
        lid = new_list(http, days=30)
        ingest(http, lid, [person(1, adUserData=GRANTED, adPersonalization=DENIED)])
        ingest(http, lid, [person(i) for i in range(2, 50)])
        assert not state.exists() and state.with_name("dm.json.journal").exists()  # journal lines, no rewrite
    with DataManagerEmulator(state_file=state, clock=clock) as e:
        assert e.member_consent(lid)[key(1)] == ("GRANTED", "DENIED") and e.member_count(lid) == 49
        clock.advance(days=31)
        assert e.member_count(lid) == 0  # the ingest times came back too


def test_the_request_body_is_never_echoed_in_errors(http: httpx.Client) -> None:
    lid = new_list(http)
    secret_hash = sha256_hex("mary@example.com")
    r = ingest(http, lid, [{"userData": {"userIdentifiers": [{"emailAddress": secret_hash}]}, "colour": "red"}])
    assert secret_hash not in json.dumps(refused(r))


def test_request_statuses_survive_a_restart_for_30_days(tmp_path: Path) -> None:
    state, clock = tmp_path / "dm.json", FakeClock()
    with DataManagerEmulator(state_file=state, clock=clock) as e, httpx.Client(base_url=e.url) as http:
        rid = ingest(http, new_list(http), [person(1)]).json()["requestId"]
    with DataManagerEmulator(state_file=state, clock=clock) as e, httpx.Client(base_url=e.url) as http:
        assert status(http, rid)["requestStatus"] == "SUCCESS"  # read by the next run
        clock.advance(days=31)
    with DataManagerEmulator(state_file=state, clock=clock) as e, httpx.Client(base_url=e.url) as http:
        refused(http.get("/v1/requestStatus:retrieve", params={"requestId": rid}), 404)


def test_audience_members_carry_no_value(http: httpx.Client, emu: DataManagerEmulator) -> None:
    """Data Manager audience members have no per-member value: `UserProperties.customer_value_bucket` belongs
    to conversion events (google-ads-datamanager 0.9.4 descriptors), so a member sending one is refused."""
    lid = new_list(http)
    valued = {**person(1), "userProperties": {"customerValueBucket": "HIGH"}}
    err = refused(ingest(http, lid, [valued]))
    assert 'Unknown name "userProperties"' in err["message"] and violation(err) == "audience_members[0]"
    assert emu.members(lid) == set()
