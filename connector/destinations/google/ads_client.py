"""Google Ads API client (google-ads): CRM-based user lists, offline user data jobs, lookalikes.

Customer Match uploads through this API are open only to developer tokens Google allowlisted
(since 2026-04); user lists and lookalike segments stay open to all. Jobs follow the platform's
rules: one UserData per person (at most 20 identifiers), add-operation requests one after another
with at most 10,000 identifiers each, never creates and removes in one job, one running job per
list, partial failures mapped back to members, the job run without blocking on its long-running
operation and its status read later with GAQL.

Members with a value (lifetime value) are added in jobs of type CUSTOMER_MATCH_WITH_ATTRIBUTES, each
UserData with `user_attribute.lifetime_value_micros`: "User attribute, can only be used with
CUSTOMER_MATCH_WITH_ATTRIBUTES job type" (UserAttribute reference); a plain list job refuses it
(ATTRIBUTES_NOT_APPLICABLE_FOR_CUSTOMER_MATCH_USER_LIST). Removals need no attributes: they go in
plain CUSTOMER_MATCH_USER_LIST jobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.ads.googleads.client import GoogleAdsClient
from google.ads.googleads.errors import GoogleAdsException
from google.api_core.exceptions import GoogleAPICallError
from google.auth.credentials import Credentials

from connector.destinations.base import AudienceStatus, BatchResult, LookalikeRef, Member, RequestOutcome
from connector.destinations.google.errors import ads_error, map_google_api_error
from connector.errors import ConnectorError, FatalError, RetriableError
from connector.retry import RetryPolicy, RetryStats

T = TypeVar("T")
log = logging.getLogger("connector.google")
VERSION = "v26"
MAX_IDENTIFIERS_PER_REQUEST = 10_000
MAX_IDENTIFIERS_PER_USER = 20
_GRPC_RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                   grpc.StatusCode.INTERNAL}  # fmt: skip


def _first_error_name(exc: GoogleAdsException) -> str:
    for err in exc.failure.errors:
        ec = err.error_code
        which = type(ec).pb(ec).WhichOneof("error_code")
        if which:
            return str(getattr(ec, which).name)
    return "UNKNOWN"


JOB_TYPES = ("CUSTOMER_MATCH_USER_LIST", "CUSTOMER_MATCH_WITH_ATTRIBUTES")


def value_micros(value: float) -> int:
    """A value (currency units) as `lifetime_value_micros`, an int64 of millionths."""
    return round(value * 1_000_000)


@dataclass
class _OpenJob:
    resource_name: str
    remove: bool
    attributes: bool = False
    identifiers: int = 0
    ran: bool = False
    members: list[str] = field(default_factory=list)


class GoogleAdsApi:
    def __init__(self, *, customer_id: str, login_customer_id: str | None, developer_token: str,
                 credentials: Credentials, endpoint: str | None, timeout: float, policy: RetryPolicy,
                 stats: RetryStats | None = None, wait_for_running_job_seconds: float = 60.0) -> None:  # fmt: skip
        self.customer_id = customer_id
        self.client = GoogleAdsClient(credentials=credentials, developer_token=developer_token, endpoint=endpoint,
                                      login_customer_id=login_customer_id, use_proto_plus=True, version=VERSION)  # fmt: skip
        self._timeout = timeout
        self._policy = policy
        self._stats = stats
        self._sleep = policy.sleep or time.sleep
        self._wait_running = wait_for_running_job_seconds
        self._services: dict[str, Any] = {}
        self._open: dict[str, _OpenJob] = {}  # list id -> the job being filled
        self._ran: set[str] = set()  # jobs this process ran

    def close(self) -> None:
        self._services.clear()

    def _svc(self, name: str) -> Any:
        if name not in self._services:
            self._services[name] = self.client.get_service(name, version=VERSION)
        return self._services[name]

    def _type(self, name: str) -> Any:
        return self.client.get_type(name, version=VERSION)

    def _enum(self, name: str) -> Any:
        return getattr(self.client.enums, name)

    def _call(self, what: str, fn: Callable[[], T], retry: bool = True) -> T:
        def once() -> T:
            try:
                return fn()
            except ConnectorError:
                raise
            except GoogleAdsException as exc:
                raise ads_error(_first_error_name(exc), what) from None
            except GoogleAPICallError as exc:
                raise map_google_api_error(exc, what) from None
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code is not None and code in _GRPC_RETRIABLE:
                    raise RetriableError(f"Google {what}: transient gRPC error ({code.name})", code=code.name) from None
                raise FatalError(f"Google {what}: gRPC error ({getattr(code, 'name', code)})") from None

        if not retry:
            return once()
        return self._policy.call(once, what=f"Google Ads {what}", stats=self._stats)

    def _search(self, query: str, what: str) -> list[Any]:
        svc = self._svc("GoogleAdsService")
        return self._call(what, lambda: list(svc.search(customer_id=self.customer_id, query=query,
                                                         timeout=self._timeout)))  # fmt: skip

    # ------------------------------------------------------------------ user lists

    def find_list(self, name: str) -> str | None:
        escaped = name.replace("\\", "\\\\").replace("'", "\\'")
        query = f"SELECT user_list.id, user_list.name FROM user_list WHERE user_list.name = '{escaped}'"  # noqa: S608
        rows = self._search(query, "find user list")
        return str(rows[0].user_list.id) if rows else None

    def _list_row(self, list_id: str) -> Any | None:
        query = (
            "SELECT user_list.id, user_list.name, user_list.size_for_search, user_list.size_for_display, "  # noqa: S608
            f"user_list.match_rate_percentage, user_list.membership_status FROM user_list WHERE user_list.id = {int(list_id)}"
        )
        rows = self._search(query, "read user list")
        return rows[0].user_list if rows else None

    def _create_list(self, user_list: Any, what: str) -> str:
        """Create a list, retried on transient errors. Creating is not idempotent: an attempt that
        failed in transit may have created the list, so every retry first looks it up by name."""
        op = self._type("UserListOperation")
        op.create = user_list
        svc = self._svc("UserListService")
        attempts = 0

        def attempt() -> str:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and (found := self.find_list(user_list.name)):
                return found
            try:
                resp = self._call(what, lambda: svc.mutate_user_lists(customer_id=self.customer_id, operations=[op],
                                                                      timeout=self._timeout), retry=False)  # fmt: skip
            except FatalError as exc:
                if exc.code != "NAME_ALREADY_USED" or (found := self.find_list(user_list.name)) is None:
                    raise
                return found
            return str(resp.results[0].resource_name.rsplit("/", 1)[-1])

        return self._policy.call(attempt, what=f"Google Ads {what}", stats=self._stats)

    def ensure_crm_list(self, name: str, known_id: str | None, membership_days: int) -> str:
        if known_id and self._list_row(known_id) is not None:
            return known_id
        found = self.find_list(name)
        if found:
            return found
        ul = self._type("UserList")
        ul.name = name
        ul.description = "Managed by connector: members are synced from a segment"
        ul.membership_status = self._enum("UserListMembershipStatusEnum").OPEN
        ul.membership_life_span = membership_days
        ul.crm_based_user_list.upload_key_type = self._enum("CustomerMatchUploadKeyTypeEnum").CONTACT_INFO
        ul.crm_based_user_list.data_source_type = self._enum("UserListCrmDataSourceTypeEnum").FIRST_PARTY
        return self._create_list(ul, "create user list")

    def user_list_status(self, list_id: str) -> AudienceStatus:
        ul = self._list_row(list_id)
        if ul is None:
            return AudienceStatus(list_id, state="missing")
        return AudienceStatus(list_id, size_lower=int(ul.size_for_search), size_upper=int(ul.size_for_search),
                              match_rate=float(ul.match_rate_percentage), state=ul.membership_status.name.lower(),
                              details={"size_display": str(ul.size_for_display)})  # fmt: skip

    # ------------------------------------------------------------------ offline user data jobs

    def _user_data(self, m: Member, attributes: bool = False) -> Any:
        ud = self._type("UserData")
        p = m.payload
        for key, attr in (("email", "hashed_email"), ("phone", "hashed_phone_number")):
            if p.get(key):
                ident = self._type("UserIdentifier")
                setattr(ident, attr, p[key])
                ud.user_identifiers.append(ident)
        if all(p.get(k) for k in ("first_name", "last_name", "country_code", "postal_code")):
            ident = self._type("UserIdentifier")
            a = ident.address_info
            a.hashed_first_name, a.hashed_last_name = p["first_name"], p["last_name"]
            a.country_code, a.postal_code = p["country_code"], p["postal_code"]
            ud.user_identifiers.append(ident)
        if len(ud.user_identifiers) > MAX_IDENTIFIERS_PER_USER:
            raise ValueError("a UserData holds at most 20 identifiers")
        if attributes and m.value is not None:
            # lifetime value as an attribute of the person; a member without one is sent without it
            ud.user_attribute.lifetime_value_micros = value_micros(m.value)
        if m.consent is not None:
            status = self._enum("ConsentStatusEnum")

            def conv(v: bool | None) -> Any:
                return status.UNSPECIFIED if v is None else (status.GRANTED if v else status.DENIED)

            ud.consent.ad_user_data = conv(m.consent.ad_user_data)
            ud.consent.ad_personalization = conv(m.consent.ad_personalization)
        return ud

    def _create_job(self, list_id: str, attributes: bool = False) -> str:
        job = self._type("OfflineUserDataJob")
        job.type_ = getattr(self._enum("OfflineUserDataJobTypeEnum"), JOB_TYPES[attributes])
        job.customer_match_user_list_metadata.user_list = f"customers/{self.customer_id}/userLists/{list_id}"
        svc = self._svc("OfflineUserDataJobService")
        resp = self._call("create offline user data job", lambda: svc.create_offline_user_data_job(
            customer_id=self.customer_id, job=job, timeout=self._timeout))  # fmt: skip
        return str(resp.resource_name)

    def stage(self, list_id: str, members: Sequence[Member], remove: bool, attributes: bool = False) -> BatchResult:
        """Add the members to the list's open job (created as needed); the job runs in `run_staged`.
        `attributes`: added members carry their value (a CUSTOMER_MATCH_WITH_ATTRIBUTES job)."""
        attributes = attributes and not remove
        job = self._open.get(list_id)
        if job is not None and (job.remove != remove or job.attributes != attributes):
            # never creates and removes in one job, nor two job types: run this one and start another
            self.run_staged(list_id)
            job = None
        if job is None:
            self._wait_for_running(list_id)
            job = _OpenJob(self._create_job(list_id, attributes), remove, attributes)
            self._open[list_id] = job
        uds = [self._user_data(m, attributes) for m in members]
        rejected: dict[str, str] = {}
        # requests one after another (parallel calls to one job give CONCURRENT_MODIFICATION)
        start = 0
        while start < len(uds):
            end, count = start, 0
            while end < len(uds) and count + len(uds[end].user_identifiers) <= MAX_IDENTIFIERS_PER_REQUEST:
                count += len(uds[end].user_identifiers)
                end += 1
            rejected.update(self._add_ops(job, members[start:end], uds[start:end], remove))
            start = end
        job.members.extend(m.key for m in members if m.key not in rejected)
        return BatchResult(request_id=job.resource_name, rejected=rejected, pending=True, received=len(members))

    def _add_ops(self, job: _OpenJob, members: Sequence[Member], uds: list[Any], remove: bool) -> dict[str, str]:
        ops = []
        for ud in uds:
            op = self._type("OfflineUserDataJobOperation")
            if remove:
                op.remove = ud
            else:
                op.create = ud
            ops.append(op)
        svc = self._svc("OfflineUserDataJobService")
        resp = self._call("add offline user data job operations", lambda: svc.add_offline_user_data_job_operations(
            request={"resource_name": job.resource_name, "enable_partial_failure": True, "operations": ops},
            timeout=self._timeout))  # fmt: skip
        rejected: dict[str, str] = {}
        status = resp.partial_failure_error
        if status and status.details:
            failure_type = self._type("GoogleAdsFailure")
            for detail in status.details:
                failure = type(failure_type).deserialize(detail.value)
                for err in failure.errors:
                    ec = err.error_code
                    which = type(ec).pb(ec).WhichOneof("error_code")
                    name = str(getattr(ec, which).name) if which else "UNKNOWN"
                    for el in err.location.field_path_elements:
                        if el.field_name == "operations" and 0 <= el.index < len(members):
                            rejected[members[el.index].key] = f"google_ads: {name}"
        job.identifiers += sum(len(ud.user_identifiers) for ud in uds)
        return rejected

    def replace(self, list_id: str, batches: Any, total: int, attributes: bool = False) -> BatchResult:
        """One job: `remove_all` first, then every member (Google's recipe for a full replace), run."""
        self.run_staged(list_id)
        self._wait_for_running(list_id)
        job = _OpenJob(self._create_job(list_id, attributes), remove=False, attributes=attributes)
        op = self._type("OfflineUserDataJobOperation")
        op.remove_all = True
        svc = self._svc("OfflineUserDataJobService")
        self._call("add remove_all operation", lambda: svc.add_offline_user_data_job_operations(
            request={"resource_name": job.resource_name, "operations": [op]}, timeout=self._timeout))  # fmt: skip
        self._open[list_id] = job
        rejected: dict[str, str] = {}
        for batch in batches:
            rejected.update(self.stage(list_id, batch, remove=False, attributes=attributes).rejected)
        self.run_staged(list_id)
        deadline = time.monotonic() + self._wait_running
        while (outcome := self.job_outcome(job.resource_name)).state == "pending":
            if time.monotonic() > deadline:
                # the job runs on; its members are confirmed by the next reconcile
                return BatchResult(request_id=job.resource_name, rejected=rejected, pending=True)
            self._sleep(1.0)
        if outcome.state == "failed":
            raise RetriableError(f"Google Ads: the replace job failed ({outcome.reason})")
        return BatchResult(request_id=job.resource_name, rejected=rejected)

    def _wait_for_running(self, list_id: str) -> None:
        """One running job per list: wait (bounded) for jobs this process ran on it."""
        deadline = time.monotonic() + self._wait_running
        for name in list(self._ran):
            while True:
                outcome = self.job_outcome(name)
                if outcome.state != "pending":
                    self._ran.discard(name)
                    break
                if time.monotonic() > deadline:
                    raise RetriableError("Google Ads: an earlier job on this user list is still running; retried later")
                self._sleep(1.0)

    def run_staged(self, list_id: str) -> None:
        job = self._open.pop(list_id, None)
        if job is None or job.ran:
            return
        svc = self._svc("OfflineUserDataJobService")
        # returns a long-running operation: not awaited here, the job status is read with GAQL later
        self._call("run offline user data job", lambda: svc.run_offline_user_data_job(
            resource_name=job.resource_name, timeout=self._timeout))  # fmt: skip
        job.ran = True
        self._ran.add(job.resource_name)

    def resume_pending_jobs(self, list_id: str) -> list[str]:
        """Run the jobs on this list that a process created, filled and never ran (it was killed before
        `finish`). Their removals are already recorded in the ledger: without this they would never
        happen. Oldest first; a job that cannot run any more is logged and left."""
        query = (
            "SELECT offline_user_data_job.resource_name, offline_user_data_job.status, "
            "offline_user_data_job.customer_match_user_list_metadata.user_list FROM offline_user_data_job "
            "WHERE offline_user_data_job.status = 'PENDING' AND offline_user_data_job.type IN "
            "('CUSTOMER_MATCH_USER_LIST', 'CUSTOMER_MATCH_WITH_ATTRIBUTES')"
        )
        mine = f"customers/{self.customer_id}/userLists/{list_id}"
        open_names = {j.resource_name for j in self._open.values()}
        names = sorted(
            (r.offline_user_data_job.resource_name for r in self._search(query, "find jobs never run")
             if r.offline_user_data_job.customer_match_user_list_metadata.user_list == mine
             and r.offline_user_data_job.resource_name not in open_names),
            key=lambda n: int(n.rsplit("/", 1)[-1]) if n.rsplit("/", 1)[-1].isdigit() else 0,
        )  # fmt: skip
        svc = self._svc("OfflineUserDataJobService")
        resumed = []
        for name in names:
            self._wait_for_running(list_id)
            try:
                self._call("run offline user data job", lambda n=name: svc.run_offline_user_data_job(  # type: ignore[misc]
                    resource_name=n, timeout=self._timeout))  # fmt: skip
            except FatalError as exc:
                log.warning("Google Ads: a job left by an interrupted run could not be run: %s", exc)
                continue
            self._ran.add(name)
            resumed.append(name)
        return resumed

    def job_outcome(self, job_resource_name: str) -> RequestOutcome:
        if "'" in job_resource_name:
            raise ValueError("not a job resource name")
        query = (
            "SELECT offline_user_data_job.resource_name, offline_user_data_job.status, "  # noqa: S608
            "offline_user_data_job.failure_reason FROM offline_user_data_job WHERE "
            f"offline_user_data_job.resource_name = '{job_resource_name}'"
        )
        rows = self._search(query, "read job status")
        if not rows:
            return RequestOutcome("failed", "job not found")
        job = rows[0].offline_user_data_job
        status = job.status.name
        if status == "SUCCESS":
            return RequestOutcome("succeeded")
        if status == "RUNNING":
            return RequestOutcome("pending")
        if status == "PENDING":
            # staged but never run (the process stopped before `finish`): the members are re-sent
            open_names = {j.resource_name for j in self._open.values()}
            return RequestOutcome("pending") if job_resource_name in open_names else RequestOutcome(
                "failed", "job was never run")  # fmt: skip
        return RequestOutcome("failed", f"job {status.lower()}: {job.failure_reason.name}")

    # ------------------------------------------------------------------ lookalikes

    def ensure_lookalike(self, seed_list_id: str, name: str, spec: Mapping[str, object], known: LookalikeRef | None,
                         seed_size: int) -> LookalikeRef | None:  # fmt: skip
        if known is not None and known.lookalike_id:
            ul = self._list_row(known.lookalike_id)
            if ul is not None:
                known.state = ul.membership_status.name.lower()
                return known
        min_seed = int(str(spec.get("min_seed_size", 1000)))
        seed = self._list_row(seed_list_id)
        size = int(seed.size_for_search) if seed is not None else seed_size
        if max(size, 0) < min_seed:
            return None
        ul = self._type("UserList")
        ul.name = name
        ul.description = "Lookalike managed by connector"
        ul.membership_status = self._enum("UserListMembershipStatusEnum").OPEN
        info = ul.lookalike_user_list
        info.seed_user_list_ids.append(int(seed_list_id))
        info.expansion_level = getattr(self._enum("LookalikeExpansionLevelEnum"), str(spec.get("expansion_level", "BALANCED")))
        info.country_codes.extend(str(c) for c in spec.get("country_codes", []) or [])  # type: ignore[attr-defined]
        lid = self._create_list(ul, "create lookalike")
        return LookalikeRef(lid, "created", {"seed_user_list_id": seed_list_id, "seed_size": str(size)})
