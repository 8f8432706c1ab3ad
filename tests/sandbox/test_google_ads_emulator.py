"""The Google Ads API emulator (gRPC over TLS) refuses what the API refuses, with real GoogleAdsFailures,
and behaves like it over time: FAILED jobs, removed lists, membership expiry, processing on a clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.ads.googleads.v26.common.types import offline_user_data as cod
from google.ads.googleads.v26.errors.types import errors as errs
from google.ads.googleads.v26.resources.types import user_list as ul_res
from google.ads.googleads.v26.services.types import google_ads_service as gas
from google.ads.googleads.v26.services.types import offline_user_data_job_service as ojs
from google.ads.googleads.v26.services.types import user_list_service as uls
from google.auth.credentials import AnonymousCredentials

from connector.clock import FakeClock
from connector.destinations.google.ads_client import GoogleAdsApi
from connector.identifiers.hashing import sha256_hex
from connector.retry import RetryPolicy
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.google_ads import API, FAILURE_KEY, SANDBOX_DEVELOPER_TOKEN, GoogleAdsEmulator
from connector.sandbox.tls import localhost_certificate

CUSTOMER = "1234567890"
CONTACT_INFO = 2  # CustomerMatchUploadKeyType
CUSTOMER_MATCH_USER_LIST = 4  # OfflineUserDataJobType
CUSTOMER_MATCH_WITH_ATTRIBUTES = 5


class Ads:
    """Raw calls with the google-ads message types: what a client that gets a field wrong would send."""

    def __init__(self, emu: GoogleAdsEmulator) -> None:
        cert, _ = localhost_certificate()
        self.channel = grpc.secure_channel(emu.endpoint, grpc.ssl_channel_credentials(root_certificates=cert))

    def call(self, service: str, method: str, req: Any, resp_t: Any) -> Any:
        fn = self.channel.unary_unary(f"/{API}.{service}/{method}", request_serializer=type(req).serialize,
                                      response_deserializer=resp_t.deserialize)  # fmt: skip
        return fn(req, metadata=(("developer-token", SANDBOX_DEVELOPER_TOKEN),), timeout=30)

    def refused(self, service: str, method: str, req: Any, resp_t: Any) -> str:
        """The GoogleAdsFailure's first error code name."""
        with pytest.raises(grpc.RpcError) as exc:
            self.call(service, method, req, resp_t)
        raw = dict(exc.value.trailing_metadata())[FAILURE_KEY]  # type: ignore[attr-defined]
        return error_name(errs.GoogleAdsFailure.deserialize(raw).errors[0])

    def create_list(self, name: str, days: int = 540) -> str:
        ul = ul_res.UserList(name=name, membership_life_span=days)
        ul.crm_based_user_list.upload_key_type = CONTACT_INFO
        req = uls.MutateUserListsRequest(customer_id=CUSTOMER, operations=[uls.UserListOperation(create=ul)])
        out = self.call("UserListService", "MutateUserLists", req, uls.MutateUserListsResponse)
        return str(out.results[0].resource_name)

    def job(self, list_name: str, job_type: int = CUSTOMER_MATCH_USER_LIST) -> str:
        req = ojs.CreateOfflineUserDataJobRequest(customer_id=CUSTOMER)
        req.job.type_ = job_type
        req.job.customer_match_user_list_metadata.user_list = list_name
        return str(self.call("OfflineUserDataJobService", "CreateOfflineUserDataJob", req,
                             ojs.CreateOfflineUserDataJobResponse).resource_name)  # fmt: skip

    def add(self, job: str, users: list[cod.UserData], remove: bool = False) -> Any:
        ops = [ojs.OfflineUserDataJobOperation(remove=u) if remove else ojs.OfflineUserDataJobOperation(create=u)
               for u in users]  # fmt: skip
        req = ojs.AddOfflineUserDataJobOperationsRequest(resource_name=job, operations=ops, enable_partial_failure=True)
        return self.call("OfflineUserDataJobService", "AddOfflineUserDataJobOperations", req,
                         ojs.AddOfflineUserDataJobOperationsResponse)  # fmt: skip

    def run(self, job: str) -> None:
        from google.longrunning import operations_pb2

        fn = self.channel.unary_unary(f"/{API}.OfflineUserDataJobService/RunOfflineUserDataJob",
                                      request_serializer=ojs.RunOfflineUserDataJobRequest.serialize,
                                      response_deserializer=operations_pb2.Operation.FromString)  # fmt: skip
        fn(ojs.RunOfflineUserDataJobRequest(resource_name=job), metadata=(("developer-token", SANDBOX_DEVELOPER_TOKEN),))

    def job_status(self, job: str) -> tuple[str, str]:
        q = ("SELECT offline_user_data_job.resource_name, offline_user_data_job.status, offline_user_data_job.failure_reason "
             f"FROM offline_user_data_job WHERE offline_user_data_job.resource_name = '{job}'")  # fmt: skip
        (row,) = self.call("GoogleAdsService", "Search", gas.SearchGoogleAdsRequest(customer_id=CUSTOMER, query=q),
                           gas.SearchGoogleAdsResponse).results  # fmt: skip
        return row.offline_user_data_job.status.name, row.offline_user_data_job.failure_reason.name


def error_name(err: errs.GoogleAdsError) -> str:
    ec = err.error_code
    return str(getattr(ec, errs.ErrorCode.pb(ec).WhichOneof("error_code")).name)


def user(i: int, **over: Any) -> cod.UserData:
    email = over.pop("email", sha256_hex(f"u{i}@x.com"))
    return cod.UserData(user_identifiers=[cod.UserIdentifier(hashed_email=email),
                                          cod.UserIdentifier(hashed_phone_number=sha256_hex(f"+1415555{i:04d}"))], **over)  # fmt: skip


def key(i: int) -> frozenset[tuple[str, str]]:
    return frozenset({("email", sha256_hex(f"u{i}@x.com")), ("phone", sha256_hex(f"+1415555{i:04d}"))})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Iterator[GoogleAdsEmulator]:
    with GoogleAdsEmulator(clock=clock) as e:
        yield e


@pytest.fixture
def ads(emu: GoogleAdsEmulator) -> Iterator[Ads]:
    a = Ads(emu)
    yield a
    a.channel.close()


def lid_of(name: str) -> str:
    return name.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------- refusals


def test_jobs_need_their_required_fields(ads: Ads) -> None:
    name = ads.create_list("vip")
    no_type = ojs.CreateOfflineUserDataJobRequest(customer_id=CUSTOMER)
    no_type.job.customer_match_user_list_metadata.user_list = name
    assert ads.refused("OfflineUserDataJobService", "CreateOfflineUserDataJob", no_type,
                       ojs.CreateOfflineUserDataJobResponse) == "INVALID_USER_LIST_TYPE"  # fmt: skip
    no_list = ojs.CreateOfflineUserDataJobRequest(customer_id=CUSTOMER)
    no_list.job.type_ = CUSTOMER_MATCH_USER_LIST
    assert ads.refused("OfflineUserDataJobService", "CreateOfflineUserDataJob", no_list,
                       ojs.CreateOfflineUserDataJobResponse) == "REQUIRED"  # fmt: skip
    foreign = ojs.CreateOfflineUserDataJobRequest(customer_id="999")
    foreign.job.type_ = CUSTOMER_MATCH_USER_LIST
    foreign.job.customer_match_user_list_metadata.user_list = name
    assert ads.refused("OfflineUserDataJobService", "CreateOfflineUserDataJob", foreign,
                       ojs.CreateOfflineUserDataJobResponse) == "INVALID_USER_LIST_ID"  # fmt: skip
    dashed = ojs.CreateOfflineUserDataJobRequest(customer_id="123-456-7890")
    assert ads.refused("OfflineUserDataJobService", "CreateOfflineUserDataJob", dashed,
                       ojs.CreateOfflineUserDataJobResponse) == "INVALID_CUSTOMER_ID"  # fmt: skip
    empty = ojs.AddOfflineUserDataJobOperationsRequest(resource_name=ads.job(name))
    assert ads.refused("OfflineUserDataJobService", "AddOfflineUserDataJobOperations", empty,
                       ojs.AddOfflineUserDataJobOperationsResponse) == "REQUIRED_NONEMPTY_LIST"  # fmt: skip


def test_operations_the_api_refuses_are_partial_failures(ads: Ads, emu: GoogleAdsEmulator) -> None:
    name = ads.create_list("vip")
    job = ads.job(name)
    incomplete = cod.UserData(user_identifiers=[cod.UserIdentifier(address_info=cod.OfflineUserAddressInfo(
        hashed_first_name=sha256_hex("mary"), country_code="US", postal_code="94107"))])  # fmt: skip
    resp = ads.add(job, [user(1), cod.UserData(), user(2, email=sha256_hex("x").upper()), incomplete,
                         user(3, email=sha256_hex("y") + "\n")])  # fmt: skip
    failure = errs.GoogleAdsFailure.deserialize(resp.partial_failure_error.details[0].value)
    got = {e.location.field_path_elements[0].index: error_name(e) for e in failure.errors}
    assert got == {1: "MISSING_USER_IDENTIFIER", 2: "INVALID_SHA256_FORMAT", 3: "REQUIRED", 4: "INVALID_SHA256_FORMAT"}
    ads.run(job)
    assert emu.members(lid_of(name)) == {key(1)}


def test_user_lists_need_a_name_a_type_and_a_life_span_of_at_most_540_days(ads: Ads) -> None:
    def create(ul: ul_res.UserList) -> str:
        req = uls.MutateUserListsRequest(customer_id=CUSTOMER, operations=[uls.UserListOperation(create=ul)])
        return ads.refused("UserListService", "MutateUserLists", req, uls.MutateUserListsResponse)

    crm = ul_res.UserList(name="too long", membership_life_span=541)
    crm.crm_based_user_list.upload_key_type = CONTACT_INFO
    assert create(crm) == "INVALID_VALUE"
    assert create(ul_res.UserList(name="no type")) == "REQUIRED"
    nameless = ul_res.UserList(membership_life_span=30)
    nameless.crm_based_user_list.upload_key_type = CONTACT_INFO
    assert create(nameless) == "REQUIRED"


# ---------------------------------------------------------------------------- faults and time


def test_a_failed_job_applies_nothing_and_reports_failed(ads: Ads, emu: GoogleAdsEmulator) -> None:
    name = ads.create_list("vip")
    job = ads.job(name)
    ads.add(job, [user(1), user(2)])
    emu.faults.failed_request_rate = 1.0
    ads.run(job)
    assert ads.job_status(job) == ("FAILED", "UNKNOWN")
    assert emu.members(lid_of(name)) == set()
    api = GoogleAdsApi(customer_id=CUSTOMER, login_customer_id=None, developer_token=SANDBOX_DEVELOPER_TOKEN,
                       credentials=AnonymousCredentials(), endpoint=emu.endpoint, timeout=10,
                       policy=RetryPolicy(max_attempts=2, backoff_base_seconds=0.0, sleep=lambda _s: None))  # fmt: skip
    outcome = api.job_outcome(job)
    assert outcome.state == "failed" and "job failed" in (outcome.reason or "")
    api.close()


def test_jobs_run_for_the_processing_delay_on_the_clock(ads: Ads, emu: GoogleAdsEmulator, clock: FakeClock) -> None:
    emu.processing_delay_seconds = 3600
    name = ads.create_list("vip")
    job = ads.job(name)
    ads.add(job, [user(1)])
    ads.run(job)
    clock.advance(3599)
    assert ads.job_status(job)[0] == "RUNNING" and emu.members(lid_of(name)) == set()
    clock.advance(1)
    assert ads.job_status(job)[0] == "SUCCESS" and emu.members(lid_of(name)) == {key(1)}


def test_members_expire_after_the_membership_life_span(ads: Ads, emu: GoogleAdsEmulator, clock: FakeClock) -> None:
    name = ads.create_list("vip", days=30)
    job = ads.job(name)
    ads.add(job, [user(1), user(2)])
    ads.run(job)
    clock.advance(days=29)
    assert emu.member_count(lid_of(name)) == 2
    clock.advance(days=1, seconds=1)
    assert emu.members(lid_of(name)) == set()
    q = f"SELECT user_list.id, user_list.size_for_search FROM user_list WHERE user_list.id = {lid_of(name)}"
    (row,) = ads.call("GoogleAdsService", "Search", gas.SearchGoogleAdsRequest(customer_id=CUSTOMER, query=q),
                      gas.SearchGoogleAdsResponse).results  # fmt: skip
    assert row.user_list.size_for_search == 0


def test_a_removed_list_is_gone_and_its_running_job_fails(ads: Ads, emu: GoogleAdsEmulator, clock: FakeClock) -> None:
    emu.processing_delay_seconds = 60
    name = ads.create_list("vip")
    job = ads.job(name)
    ads.add(job, [user(1)])
    ads.run(job)
    req = uls.MutateUserListsRequest(customer_id=CUSTOMER, operations=[uls.UserListOperation(remove=name)])
    assert ads.call("UserListService", "MutateUserLists", req, uls.MutateUserListsResponse).results[0].resource_name == name
    clock.advance(60)
    assert ads.job_status(job)[0] == "FAILED" and emu.member_count(lid_of(name)) is None
    assert ads.refused("UserListService", "MutateUserLists", req, uls.MutateUserListsResponse) == "RESOURCE_NOT_FOUND"


def test_lists_deleted_between_runs_and_state_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "ads.json"
    with GoogleAdsEmulator(state_file=state) as e:
        ads = Ads(e)
        name = ads.create_list("vip")
        job = ads.job(name)
        ads.add(job, [user(i) for i in range(20)])
        ads.run(job)
        ads.channel.close()
        assert not state.exists()  # the run's changes are journal lines until the emulator stops
    with GoogleAdsEmulator(state_file=state) as e:
        assert e.members(lid_of(name)) == {key(i) for i in range(20)}
        assert Ads(e).create_list("other") != name  # ids are not reused after a restart
    with GoogleAdsEmulator(state_file=state, faults=FaultKnobs(audience_deletion_rate=1.0)) as e:
        assert e.lists == {} and e.faults.injected == {"audience_deleted": 2}


# ---------------------------------------------------------------------------- customer attributes


def failures(resp: Any) -> dict[int, str]:
    if not resp.partial_failure_error.details:
        return {}
    failure = errs.GoogleAdsFailure.deserialize(resp.partial_failure_error.details[0].value)
    return {e.location.field_path_elements[0].index: error_name(e) for e in failure.errors}


def test_lifetime_value_only_in_attribute_jobs_with_contact_info(ads: Ads, emu: GoogleAdsEmulator) -> None:
    """UserAttribute "can only be used with CUSTOMER_MATCH_WITH_ATTRIBUTES job type"; attributes only with
    contact info identifiers; a bucket is 1..10 (0 only on remove) - the google-ads v26 reference."""
    name = ads.create_list("ltv")
    plain = ads.job(name)
    valued = cod.UserAttribute(lifetime_value_micros=12_500_000)
    assert failures(ads.add(plain, [user(1, user_attribute=valued), user(2)])) == {
        0: "ATTRIBUTES_NOT_APPLICABLE_FOR_CUSTOMER_MATCH_USER_LIST"
    }
    ads.run(plain)
    job = ads.job(name, CUSTOMER_MATCH_WITH_ATTRIBUTES)
    crm_id = cod.UserData(user_identifiers=[cod.UserIdentifier(third_party_user_id="crm-7")], user_attribute=valued)
    resp = ads.add(
        job,
        [
            user(3, user_attribute=valued),
            crm_id,
            user(4, user_attribute=cod.UserAttribute(lifetime_value_bucket=11)),
            user(5),
            user(6, user_attribute=cod.UserAttribute(lifetime_value_bucket=10)),
        ],
    )
    assert failures(resp) == {1: "INCOMPATIBLE_USER_IDENTIFIER_FOR_ATTRIBUTES", 2: "LIFETIME_VALUE_BUCKET_NOT_IN_RANGE"}
    ads.run(job)
    lid = lid_of(name)
    assert emu.members(lid) == {key(2), key(3), key(5), key(6)}  # a member without an attribute is still one
    assert emu.values(lid) == {key(3): 12_500_000}
    # added again with a new value: the value follows; without one: the last stays; removed: gone with it
    again = ads.job(name, CUSTOMER_MATCH_WITH_ATTRIBUTES)
    ads.add(
        again,
        [
            user(3, user_attribute=cod.UserAttribute(lifetime_value_micros=99_000_000)),
            user(5, user_attribute=cod.UserAttribute(lifetime_value_micros=0)),
        ],
    )
    ads.run(again)
    assert emu.values(lid) == {key(3): 99_000_000, key(5): 0}
    gone = ads.job(name)
    ads.add(gone, [user(3)], remove=True)
    ads.run(gone)
    assert emu.values(lid) == {key(5): 0}


def test_attribute_jobs_need_the_allowlisting_of_any_customer_match_upload(clock: FakeClock) -> None:
    with GoogleAdsEmulator(clock=clock, allowlisted=False) as e:
        ads = Ads(e)
        name = ads.create_list("ltv")
        req = ojs.CreateOfflineUserDataJobRequest(customer_id=CUSTOMER)
        req.job.type_ = CUSTOMER_MATCH_WITH_ATTRIBUTES
        req.job.customer_match_user_list_metadata.user_list = name
        assert ads.refused("OfflineUserDataJobService", "CreateOfflineUserDataJob", req,
                           ojs.CreateOfflineUserDataJobResponse) == "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE"  # fmt: skip
        ads.channel.close()


def test_lifetime_values_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "ads.json"
    with GoogleAdsEmulator(state_file=state) as e:
        ads = Ads(e)
        name = ads.create_list("ltv")
        job = ads.job(name, CUSTOMER_MATCH_WITH_ATTRIBUTES)
        ads.add(job, [user(i, user_attribute=cod.UserAttribute(lifetime_value_micros=i * 1_000_000)) for i in range(1, 4)])
        ads.run(job)
        ads.channel.close()
    with GoogleAdsEmulator(state_file=state) as e:
        assert e.values(lid_of(name)) == {key(i): i * 1_000_000 for i in range(1, 4)}
