"""GoogleDestination (Data Manager API) with the official client against the Data Manager emulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.ads import datamanager_v1 as dm
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import BadRequest as InvalidArgument  # REST maps 400 to BadRequest
from google.auth.credentials import AnonymousCredentials
from pydantic import ValidationError

from connector.clock import FakeClock
from connector.destinations.base import BatchSession, Consent, Member
from connector.destinations.google.datamanager_client import DataManagerClient
from connector.destinations.google.destination import GoogleDestination
from connector.destinations.google.errors import ads_error, classify_ads_error_code, map_google_api_error
from connector.errors import AuthError, ConfigError, FatalError, QuotaExhaustedError, RetriableError, TermsNotAcceptedError
from connector.identifiers.hashing import sha256_hex
from connector.retry import RetryPolicy
from connector.sandbox.google_datamanager import DataManagerEmulator
from connector.settings import GoogleDestinationConfig

S = BatchSession(1, 1, True, 1)


@pytest.fixture
def emu() -> Iterator[DataManagerEmulator]:
    with DataManagerEmulator() as e:
        yield e


def make(emu: DataManagerEmulator) -> GoogleDestination:
    cfg = GoogleDestinationConfig(
        type="google", customer_id="123-456-7890", datamanager_endpoint=emu.url, customer_match_terms="accepted"
    )
    policy = RetryPolicy(max_attempts=10, backoff_base_seconds=0.0, sleep=lambda _s: None)
    client = DataManagerClient(customer_id="1234567890", login_customer_id=None, credentials=AnonymousCredentials(),
                               endpoint=emu.url, timeout=10, policy=policy, stats=None)  # fmt: skip
    return GoogleDestination("g", cfg, client, policy=policy)


GRANTED = Consent(True, True)


def member(i: int, consent: Consent | None = GRANTED) -> Member:
    return Member(f"k{i}", {"email": sha256_hex(f"u{i}@x.com"), "phone": sha256_hex(f"+1415{i:07d}"),
                            "first_name": sha256_hex("mary"), "last_name": sha256_hex("smith"),
                            "country_code": "US", "postal_code": "94107"}, consent)  # fmt: skip


def test_one_member_is_one_audience_member_with_all_identifiers(emu: DataManagerEmulator) -> None:
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    assert dest.ensure_audience("vip", None, ["email"]).audience_id == a.audience_id  # found by name
    out = dest.add_members(a, [member(1)], S)
    assert out.pending and out.request_id
    (row,) = emu.members(a.audience_id)
    assert dict(row)["email"] == sha256_hex("u1@x.com") and dict(row)["postal_code"] == "94107"
    body = emu.request_log[-1]["body"]
    assert '"encoding": 1' in body.replace('"encoding":1', '"encoding": 1')  # HEX, sent as a number


def test_per_member_consent_is_sent_and_denied_is_not_ingested(emu: DataManagerEmulator) -> None:
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    out = dest.add_members(a, [member(1), member(2, Consent(False, True))], S)
    assert len(emu.members(a.audience_id)) == 1
    outcome = dest.reconcile(a, [out.request_id or ""])[out.request_id or ""]
    assert outcome.state == "succeeded" and "denied_consent=1" in (outcome.reason or "")


def test_request_status_pending_then_succeeded(emu: DataManagerEmulator) -> None:
    emu.clock = clock = FakeClock()
    emu.processing_delay_seconds = 600
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    rid = dest.add_members(a, [member(1)], S).request_id or ""
    assert dest.reconcile(a, [rid])[rid].state == "pending"
    clock.advance(599)
    assert dest.reconcile(a, [rid])[rid].state == "pending"
    clock.advance(1)
    assert dest.reconcile(a, [rid])[rid].state == "succeeded"


def test_a_failed_request_is_reported_failed_and_nothing_is_applied(emu: DataManagerEmulator) -> None:
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    emu.faults.failed_request_rate = 1.0
    rid = dest.add_members(a, [member(1), member(2)], S).request_id or ""
    outcome = dest.reconcile(a, [rid])[rid]
    assert outcome.state == "failed" and "FAILED" in (outcome.reason or "") and "internal_error=2" in (outcome.reason or "")
    assert emu.members(a.audience_id) == set()


def test_every_ingest_carries_the_accepted_customer_match_terms(emu: DataManagerEmulator) -> None:
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    dest.add_members(a, [member(1)], S)
    (ingest,) = [e for e in emu.request_log if e["path"] == "/v1/audienceMembers:ingest"]
    assert json.loads(ingest["body"])["termsOfService"] == {"customerMatchTermsOfServiceStatus": 1}  # ACCEPTED


@pytest.mark.parametrize("command", ["validate", "sync"])
def test_validate_and_sync_refuse_a_google_destination_without_the_terms(tmp_path: Path, command: str) -> None:
    from typer.testing import CliRunner

    from connector.cli import app

    (tmp_path / "m.csv").write_text("id,email\n1,a@example.com\n", encoding="utf-8")
    cfg = tmp_path / "connector.toml"
    cfg.write_text("""[destinations.ads]
type = "google"
sandbox = true
customer_id = "123-456-7890"
[segments.vip]
source = { type = "csv", path = "m.csv" }
key = "id"
identifiers = { email = "email" }
destinations = ["ads"]
""", encoding="utf-8")  # fmt: skip
    result = CliRunner().invoke(app, [command, "--config", str(cfg)])
    assert result.exit_code == 2
    assert "destinations.ads" in result.output and 'customer_match_terms = "accepted"' in result.output
    assert "https://support.google.com/adspolicy/answer/6299717" in result.output
    assert not (tmp_path / ".connector").exists()  # nothing was started or sent


def test_a_google_destination_without_the_customer_match_terms_is_refused(emu: DataManagerEmulator) -> None:
    with pytest.raises(ValidationError, match=r"customer_match_terms = \"accepted\".*answer/6299717"):
        GoogleDestinationConfig(type="google", customer_id="123-456-7890", datamanager_endpoint=emu.url)
    unchecked = GoogleDestinationConfig.model_construct(type="google", customer_id="1234567890", upload_api="datamanager",
                                                        customer_match_terms=None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"destinations\.g: set customer_match_terms"):
        GoogleDestination("g", unchecked, None, policy=RetryPolicy())


def test_emulator_enforces_limits_like_the_api(emu: DataManagerEmulator) -> None:
    client = dm.IngestionServiceClient(credentials=AnonymousCredentials(), transport="rest",
                                       client_options=ClientOptions(api_endpoint=emu.url))  # fmt: skip
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    target = dm.Destination(operating_account=dm.ProductAccount(account_type=1, account_id="1234567890"),
                            product_destination_id=a.audience_id)  # fmt: skip
    one = dm.AudienceMember(user_data=dm.UserData(user_identifiers=[dm.UserIdentifier(email_address=sha256_hex("a"))]))
    tos = dm.TermsOfService(customer_match_terms_of_service_status=dm.TermsOfServiceStatus.ACCEPTED)
    with pytest.raises(InvalidArgument, match="at most 10000"):
        client.ingest_audience_members(request=dm.IngestAudienceMembersRequest(
            destinations=[target], audience_members=[one] * 10_001, encoding=dm.Encoding.HEX, terms_of_service=tos))  # fmt: skip
    with pytest.raises(InvalidArgument, match="encoding"):
        client.ingest_audience_members(request=dm.IngestAudienceMembersRequest(destinations=[target], audience_members=[one],
                                                                               terms_of_service=tos))  # fmt: skip
    with pytest.raises(InvalidArgument, match="customer_match_terms_of_service_status must be ACCEPTED"):
        client.ingest_audience_members(request=dm.IngestAudienceMembersRequest(
            destinations=[target], audience_members=[one], encoding=dm.Encoding.HEX))  # fmt: skip
    bad = dm.AudienceMember(user_data=dm.UserData(user_identifiers=[dm.UserIdentifier(email_address="a@b.com")]))
    with pytest.raises(InvalidArgument, match="SHA-256"):
        client.ingest_audience_members(request=dm.IngestAudienceMembersRequest(
            destinations=[target], audience_members=[bad], encoding=dm.Encoding.HEX, terms_of_service=tos))  # fmt: skip


def test_transient_errors_converge_and_quota_stops(emu: DataManagerEmulator) -> None:
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    emu.faults.error_rates = {"UNAVAILABLE": 0.5}
    emu.faults.reseed(3)
    for i in range(10):
        dest.add_members(a, [member(i)], S)
    assert len(emu.members(a.audience_id)) == 10 and emu.faults.total_injected > 0


def test_error_classification() -> None:
    from google.api_core import exceptions as gexc

    assert isinstance(map_google_api_error(gexc.ServiceUnavailable("x"), "w"), RetriableError)
    assert isinstance(map_google_api_error(gexc.InternalServerError("x"), "w"), RetriableError)
    assert isinstance(map_google_api_error(gexc.ResourceExhausted("daily quota exceeded"), "w"), QuotaExhaustedError)
    assert isinstance(map_google_api_error(gexc.PermissionDenied("x"), "w"), AuthError)
    assert type(map_google_api_error(gexc.InvalidArgument("x"), "w")) is FatalError
    assert classify_ads_error_code("CONCURRENT_MODIFICATION") is RetriableError
    assert classify_ads_error_code("RESOURCE_EXHAUSTED") is QuotaExhaustedError
    assert classify_ads_error_code("CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS") is TermsNotAcceptedError
    assert 'upload_api = "datamanager"' in str(ads_error("CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE", "upload"))


def test_member_bodies_are_the_json_the_official_client_would_send(emu: DataManagerEmulator) -> None:
    from google.protobuf import json_format

    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    members = [member(1), member(2, Consent(False, None)), member(3, None)]
    dest.add_members(a, members, S)
    dest.remove_members(a, members[:1], S)
    sent = [json.loads(e["body"]) for e in emu.request_log if e["path"].startswith("/v1/audienceMembers:")]
    target = dm.Destination(operating_account=dm.ProductAccount(account_type=dm.ProductAccount.AccountType.GOOGLE_ADS,
                                                                account_id="1234567890"),
                            product_destination_id=a.audience_id)  # fmt: skip

    def sdk_member(m: Member, consent: bool = True) -> dm.AudienceMember:
        p = m.payload
        out = dm.AudienceMember(user_data=dm.UserData(user_identifiers=[
            dm.UserIdentifier(email_address=p["email"]), dm.UserIdentifier(phone_number=p["phone"]),
            dm.UserIdentifier(address=dm.AddressInfo(given_name=p["first_name"], family_name=p["last_name"],
                                                     region_code=p["country_code"], postal_code=p["postal_code"]))]))  # fmt: skip
        if consent and m.consent is not None:

            def status(v: bool | None) -> int:
                return 0 if v is None else (1 if v else 2)

            out.consent = dm.Consent(ad_user_data=status(m.consent.ad_user_data),
                                     ad_personalization=status(m.consent.ad_personalization))  # fmt: skip
        return out

    ingest = dm.IngestAudienceMembersRequest(destinations=[target], audience_members=[sdk_member(m) for m in members],
                                             encoding=dm.Encoding.HEX, terms_of_service=dm.TermsOfService(
                                                 customer_match_terms_of_service_status=dm.TermsOfServiceStatus.ACCEPTED))  # fmt: skip
    remove = dm.RemoveAudienceMembersRequest(destinations=[target], audience_members=[sdk_member(members[0], False)],
                                             encoding=dm.Encoding.HEX)  # fmt: skip
    expected = [json_format.MessageToDict(type(r).pb(r), use_integers_for_enums=True) for r in (ingest, remove)]
    assert sent == expected


def test_a_dropped_connection_is_retried(emu: DataManagerEmulator) -> None:
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    drops = iter([True])  # the next write call loses its connection before an answer
    emu.faults.drop = lambda write: write and next(drops, False)  # type: ignore[method-assign]
    out = dest.add_members(a, [member(1)], S)
    assert out.request_id and next(drops, None) is None
    assert sum(e["path"] == "/v1/audienceMembers:ingest" for e in emu.request_log) == 2
    assert emu.members(a.audience_id) == {frozenset(member(1).payload.items())}


def test_a_list_deleted_on_the_platform_is_replaced_by_a_new_empty_one(emu: DataManagerEmulator) -> None:
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])
    dest.add_members(a, [member(1)], S)
    emu.delete_audience(a.audience_id)
    assert dest.audience_status(a).state == "missing"
    b = dest.ensure_audience("vip", a, ["email"])
    assert b.audience_id != a.audience_id and emu.members(b.audience_id) == set()


def test_members_expire_from_the_list_after_membership_days(emu: DataManagerEmulator) -> None:
    emu.clock = clock = FakeClock()
    dest = make(emu)
    a = dest.ensure_audience("vip", None, ["email"])  # membership_days = 540 (the default)
    dest.add_members(a, [member(1)], S)
    clock.advance(days=540)
    assert dest.audience_status(a).size_lower == 1
    clock.advance(1)
    assert dest.audience_status(a).size_lower == 0 and emu.members(a.audience_id) == set()


def test_a_column_batch_makes_the_members_the_official_client_would_send() -> None:
    """`members_json` writes JSON text from columns (a batch's, or `Member`s'): the same members, consent and
    addresses as the official client's messages, for every consent code and any missing identifier."""
    import os

    import pyarrow as pa
    from google.protobuf import json_format

    from connector.destinations.base import MemberBatch
    from connector.destinations.google.datamanager_client import members_json

    n = 18
    digests = {k: pa.array([os.urandom(32) if (i + j) % 3 else None for i in range(n)], pa.binary())
               for j, k in enumerate(("email", "phone", "first_name", "last_name"))}  # fmt: skip
    text = {
        "country_code": pa.array([None if i % 4 == 0 else "US" for i in range(n)]),
        "postal_code": pa.array(['9"4\\1é' if i % 5 else None for i in range(n)]),
    }  # escaped in JSON
    batch = MemberBatch(
        pa.array([os.urandom(16) for _ in range(n)], pa.binary()),
        {**digests, **text},
        pa.array([i % 9 for i in range(n)], pa.uint8()),
    )  # every consent code 0..8

    def official(m: Member, consent: bool) -> dict[str, Any]:
        p = m.payload
        idents = [dm.UserIdentifier(email_address=p["email"])] if p.get("email") else []
        idents += [dm.UserIdentifier(phone_number=p["phone"])] if p.get("phone") else []
        if all(p.get(k) for k in ("first_name", "last_name", "country_code", "postal_code")):
            idents.append(dm.UserIdentifier(address=dm.AddressInfo(given_name=p["first_name"], family_name=p["last_name"],
                                                                   region_code=p["country_code"],
                                                                   postal_code=p["postal_code"])))  # fmt: skip
        out = dm.AudienceMember(user_data=dm.UserData(user_identifiers=idents))
        # a consent with nothing stated is left out (proto3's default), as the existing members test sends it
        if consent and m.consent is not None and m.consent != Consent(None, None):

            def status(v: bool | None) -> int:
                return 0 if v is None else (1 if v else 2)

            out.consent = dm.Consent(ad_user_data=status(m.consent.ad_user_data),
                                     ad_personalization=status(m.consent.ad_personalization))  # fmt: skip
        doc: dict[str, Any] = json_format.MessageToDict(type(out).pb(out), use_integers_for_enums=True)
        return doc

    for consent in (True, False):
        expected = [official(m, consent) for m in batch]
        assert json.loads(members_json(batch, with_consent=consent)) == expected
        assert json.loads(members_json(list(batch), with_consent=consent)) == expected
    assert sum("consent" in m for m in json.loads(members_json(batch))) == 16  # codes 1..8, twice
