"""Emulator of the Google Ads API (gRPC over TLS, v26) subset used for Customer Match and lookalikes.

Services: UserListService.MutateUserLists (CRM-based and lookalike lists), OfflineUserDataJobService
(create, add operations, run), GoogleAdsService.Search/SearchStream (the few GAQL shapes
`connector` sends), google.longrunning.Operations/GetOperation. Messages are the google-ads
package's own proto-plus types; errors are real `GoogleAdsFailure`s in the trailing metadata,
so the official client raises `GoogleAdsException` as it would against Google.

Enforced: developer token; required fields (customer id, a job of type CUSTOMER_MATCH_USER_LIST or
CUSTOMER_MATCH_WITH_ATTRIBUTES on an existing list of that customer, a job resource name, at least one
operation, a UserData with at least one identifier, complete addresses: FieldError.REQUIRED / REQUIRED_NONEMPTY_LIST); list names
and a membership life span of at most 540 days; at most 100,000 identifiers a request and 20 per
UserData; SHA-256 as 64 lowercase hex (INVALID_SHA256_FORMAT, partial failure per operation);
CONCURRENT_MODIFICATION when two calls hit one job at once; CONFLICTING_OPERATION when creates
and removes meet in one job; consent DENIED -> CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS;
`allowlisted = False` -> CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE on uploads (user lists still
work); one lookalike per seed/expansion/countries; job processing delay (RUNNING, then SUCCESS, or
FAILED with nothing applied: `faults.failed_request_rate`); user lists removed
(`UserListOperation.remove`, `delete_audience`, `faults.audience_deletion_rate` between runs);
members older than the list's membership life span drop out. Time comes from an injectable clock.
Customer attributes, as the UserAttribute reference and the OfflineUserDataJobError enum (google-ads
v26) state them: a `user_attribute` "can only be used with CUSTOMER_MATCH_WITH_ATTRIBUTES job type"
(ATTRIBUTES_NOT_APPLICABLE_FOR_CUSTOMER_MATCH_USER_LIST in a plain list job); attributes only with
contact info identifiers (INCOMPATIBLE_USER_IDENTIFIER_FOR_ATTRIBUTES); `lifetime_value_bucket` 1..10,
0 only on removals (LIFETIME_VALUE_BUCKET_NOT_IN_RANGE); `lifetime_value_micros` is an int64 (the wire
type); attribute jobs need the same allowlisting as any Customer Match upload. A member's lifetime
value is kept beside it (a member added again without one keeps the last).

Requests are read from the raw protobuf messages (no proto-plus wrapper per identifier) and list
members are held in a dict keyed by their identifiers packed into `bytes` (`connector.sandbox.members`),
their time of addition as the value, so a 10,000-row call is cheap; each change appends one journal
frame of its own rows to the state file.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from google.rpc import status_pb2

from connector.clock import SYSTEM_CLOCK, Clock
from connector.sandbox import members as keys
from connector.sandbox.base import Emulator
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.tls import localhost_certificate


class _Module:
    """A module imported when first used: the google-ads v26 types take over a second to import (the package
    imports all of them), and a sandbox starts this emulator whether or not a run calls the Google Ads API."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


if TYPE_CHECKING:
    from google.ads.googleads.v26.enums.types import offline_user_data_job_status as job_status_enum
    from google.ads.googleads.v26.errors.types import errors as errs
    from google.ads.googleads.v26.resources.types import offline_user_data_job as ouj
    from google.ads.googleads.v26.resources.types import user_list as ul_res
    from google.ads.googleads.v26.services.types import google_ads_service as gas
    from google.ads.googleads.v26.services.types import offline_user_data_job_service as ojs
    from google.ads.googleads.v26.services.types import user_list_service as uls
else:
    _V26 = "google.ads.googleads.v26"
    job_status_enum = _Module(f"{_V26}.enums.types.offline_user_data_job_status")
    errs = _Module(f"{_V26}.errors.types.errors")
    ouj = _Module(f"{_V26}.resources.types.offline_user_data_job")
    ul_res = _Module(f"{_V26}.resources.types.user_list")
    gas = _Module(f"{_V26}.services.types.google_ads_service")
    ojs = _Module(f"{_V26}.services.types.offline_user_data_job_service")
    uls = _Module(f"{_V26}.services.types.user_list_service")

API = "google.ads.googleads.v26.services"
FAILURE_KEY = "google.ads.googleads.v26.errors.googleadsfailure-bin"
_HEX64 = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
SANDBOX_DEVELOPER_TOKEN = "sandbox-developer-token"  # noqa: S105 - the emulator's fixed token, not a secret
MAX_IDENTIFIERS_PER_REQUEST = 100_000
MAX_IDENTIFIERS_PER_USER = 20
MAX_MEMBERSHIP_DAYS = 540
CUSTOMER_MATCH_USER_LIST = 4  # OfflineUserDataJobType
CUSTOMER_MATCH_WITH_ATTRIBUTES = 5
JOB_TYPES = {CUSTOMER_MATCH_USER_LIST: "CUSTOMER_MATCH_USER_LIST",
             CUSTOMER_MATCH_WITH_ATTRIBUTES: "CUSTOMER_MATCH_WITH_ATTRIBUTES"}  # fmt: skip
CONTACT_INFO = frozenset({"hashed_email", "hashed_phone_number", "address_info"})
CONSENT_DENIED = 3  # ConsentStatus
_ERROR_FIELDS = {
    "CONCURRENT_MODIFICATION": "database_error", "INVALID_SHA256_FORMAT": "offline_user_data_job_error",
    "CONFLICTING_OPERATION": "offline_user_data_job_error", "TOO_MANY_USER_IDENTIFIERS": "user_data_error",
    "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS": "offline_user_data_job_error",
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE": "not_allowlisted_error", "NAME_ALREADY_USED": "user_list_error",
    "SEED_LIST_DOES_NOT_EXIST": "user_list_error", "DUPLICATE_LOOKALIKE": "user_list_error",
    "INTERNAL_ERROR": "internal_error", "TRANSIENT_ERROR": "internal_error",
    "RESOURCE_EXHAUSTED": "quota_error", "RESOURCE_TEMPORARILY_EXHAUSTED": "quota_error",
    "DEVELOPER_TOKEN_NOT_APPROVED": "authorization_error", "USER_PERMISSION_DENIED": "authorization_error",
    "REQUIRED": "field_error", "REQUIRED_NONEMPTY_LIST": "field_error", "INVALID_VALUE": "field_error",
    "INVALID_USER_LIST_TYPE": "offline_user_data_job_error", "INVALID_USER_LIST_ID": "offline_user_data_job_error",
    "MISSING_USER_IDENTIFIER": "offline_user_data_job_error", "INVALID_CUSTOMER_ID": "request_error",
    "RESOURCE_NOT_FOUND": "mutate_error", "INVALID_NAME": "user_list_error",
    "INCOMPATIBLE_UPLOAD_KEY_TYPE": "offline_user_data_job_error", "JOB_ALREADY_STARTED": "offline_user_data_job_error",
    "ATTRIBUTES_NOT_APPLICABLE_FOR_CUSTOMER_MATCH_USER_LIST": "offline_user_data_job_error",
    "INCOMPATIBLE_USER_IDENTIFIER_FOR_ATTRIBUTES": "offline_user_data_job_error",
    "LIFETIME_VALUE_BUCKET_NOT_IN_RANGE": "offline_user_data_job_error",
}  # fmt: skip
_GRPC_CODE = {"CONCURRENT_MODIFICATION": grpc.StatusCode.ABORTED, "INTERNAL_ERROR": grpc.StatusCode.INTERNAL,
              "TRANSIENT_ERROR": grpc.StatusCode.UNAVAILABLE, "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
              "RESOURCE_TEMPORARILY_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
              "DEVELOPER_TOKEN_NOT_APPROVED": grpc.StatusCode.PERMISSION_DENIED,
              "USER_PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED}  # fmt: skip


def google_ads_error(name: str, message: str, index: int | None = None) -> errs.GoogleAdsError:
    field = _ERROR_FIELDS[name]
    enum = errs.ErrorCode.meta.fields[field].enum
    err = errs.GoogleAdsError(error_code=errs.ErrorCode(**{field: enum[name]}), message=message)
    if index is not None:
        err.location = errs.ErrorLocation(field_path_elements=[
            errs.ErrorLocation.FieldPathElement(field_name="operations", index=index)])  # fmt: skip
    return err


class AdsAbort(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


Key = bytes  # a member's identifiers, packed (`connector.sandbox.members.google_key`)
_EMAIL, _PHONE = keys.google_piece("email", ""), keys.google_piece("phone", "")  # the tags' hex text


class GoogleAdsEmulator(Emulator):
    MEMBERS = pa.schema([("key", pa.binary()), ("t", pa.float64()), ("value", pa.int64())])

    def __init__(self, *, state_file: Path | None = None, developer_token: str | None = SANDBOX_DEVELOPER_TOKEN,
                 allowlisted: bool = True, faults: FaultKnobs | None = None, processing_delay_seconds: float = 0.0,
                 seed_sizes: Callable[[str], int | None] | None = None, clock: Clock | None = None) -> None:  # fmt: skip
        self.state_file = state_file
        self.developer_token = developer_token
        self.allowlisted = allowlisted
        self.faults = faults or FaultKnobs()
        self.processing_delay_seconds = processing_delay_seconds
        self.seed_sizes = seed_sizes  # sizes of lists kept elsewhere (the Data Manager emulator, same ids)
        self.clock = clock or SYSTEM_CLOCK
        # id -> {"list": UserList JSON, "members": {key: added_at}, "ttl": life span seconds, "oldest": bound}
        self.lists: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.request_log: list[dict[str, Any]] = []
        self.write_calls = 0
        self._lock = threading.RLock()
        self._busy: set[str] = set()
        self._next_id = 8_000_000_000
        self._load_state()
        if self.lists and self.faults.audience_deletion_rate > 0:
            self.between_runs()
        cert, key = localhost_certificate()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self._server.add_generic_rpc_handlers(self._handlers())
        self.port = self._server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key, cert)]))

    @property
    def endpoint(self) -> str:
        return f"localhost:{self.port}"

    def _start_server(self) -> str:
        self._server.start()
        return self.endpoint

    def _stop_server(self) -> None:
        self._server.stop(grace=None)

    # ------------------------------------------------------------------ state

    def _table(self, members: list[Key], values: list[int | None] | None = None) -> pa.Table:
        """Journal rows: the members (the time of an addition is in the entry) and their values, if any."""
        n = len(members)
        return pa.table([pa.array(members, pa.binary()), pa.nulls(n, pa.float64()),
                         pa.array(values, pa.int64()) if values is not None else pa.nulls(n, pa.int64())],
                        schema=self.MEMBERS)  # fmt: skip

    def _state(self) -> tuple[dict[str, Any], dict[str, pa.Table]]:
        tables = {}
        for lid, e in self.lists.items():
            members, values = e["members"], e["values"]
            tables[lid] = pa.table([pa.array(list(members), pa.binary()), pa.array(list(members.values()), pa.float64()),
                                    pa.array([values.get(k) for k in members], pa.int64())], schema=self.MEMBERS)  # fmt: skip
        return {"next_id": self._next_id, "lists": {lid: e["list"] for lid, e in self.lists.items()}}, tables

    def _restore(self, state: dict[str, Any], members: dict[str, pa.Table]) -> None:
        self._next_id = int(state.get("next_id", self._next_id))
        for lid, doc in state.get("lists", {}).items():
            self._put_list(lid, doc)
            rows = members[lid]
            keys_ = rows.column("key").to_pylist()
            e = self.lists[lid]
            e["members"] = dict(zip(keys_, rows.column("t").to_pylist(), strict=True))
            e["oldest"] = min(e["members"].values(), default=float("inf"))
            e["values"] = {k: v for k, v in zip(keys_, rows.column("value").to_pylist(), strict=True) if v is not None}

    def _replay(self, entry: dict[str, Any], rows: pa.Table | None) -> None:
        op, lid = entry["op"], entry["id"]
        if op == "list":
            self._put_list(lid, entry["list"])
            self._next_id = max(self._next_id, int(entry.get("next_id", 0)))
        elif op == "drop":
            self.lists.pop(lid, None)
        elif op == "next_id":
            self._next_id = max(self._next_id, int(entry["next_id"]))
        elif lid in self.lists:
            members, values = self.lists[lid]["members"], self.lists[lid]["values"]
            if op == "clear":
                members.clear()
                values.clear()
            elif op == "add" and rows is not None:
                added = rows.column("key").to_pylist()
                self._put_members(lid, added, entry["t"])
                values.update((k, v) for k, v in zip(added, rows.column("value").to_pylist(), strict=True) if v is not None)
            elif op == "del" and rows is not None:
                for k in rows.column("key").to_pylist():
                    members.pop(k, None)
                    values.pop(k, None)

    def _put_list(self, lid: str, doc: dict[str, Any]) -> None:
        span = doc.get("membershipLifeSpan")
        days = MAX_MEMBERSHIP_DAYS if span in (None, "", "0", 0) else int(span)
        self.lists[lid] = {"list": doc, "members": {}, "ttl": days * 86400.0, "oldest": float("inf"), "values": {}}

    def _put_members(self, lid: str, added: list[Key], t: float) -> None:
        e = self.lists[lid]
        e["members"].update(dict.fromkeys(added, t))
        if added and t < e["oldest"]:
            e["oldest"] = t

    def _expire(self, lid: str) -> None:
        """Members older than the list's membership life span drop out, as on the platform."""
        e = self.lists.get(lid)
        if e is None:
            return
        cutoff = self.clock.time() - e["ttl"]
        if e["oldest"] >= cutoff:
            return
        members = e["members"]
        gone = [k for k, t in members.items() if t < cutoff]
        for k in gone:
            del members[k]
            e["values"].pop(k, None)
        e["oldest"] = min(members.values(), default=float("inf"))
        if gone:
            self._record({"op": "del", "id": lid}, self._table(gone))

    def members(self, list_id: str) -> set[frozenset[tuple[str, str]]]:
        with self._lock:
            self._expire(list_id)
            return {keys.google_pairs(k) for k in self.lists[list_id]["members"]}

    def values(self, list_id: str) -> dict[frozenset[tuple[str, str]], int]:
        """Each member's `lifetime_value_micros`, for the members that have one."""
        with self._lock:
            self._expire(list_id)
            return {keys.google_pairs(k): v for k, v in self.lists[list_id]["values"].items()}

    def member_count(self, list_id: str) -> int | None:
        with self._lock:
            if list_id not in self.lists:
                return None
            self._expire(list_id)
            return len(self.lists[list_id]["members"])

    def _audiences(self) -> dict[str, Any]:
        return self.lists

    def user_list(self, list_id: str) -> ul_res.UserList:
        ul: ul_res.UserList = ul_res.UserList.from_json(json.dumps(self.lists[list_id]["list"]))
        return ul

    # ------------------------------------------------------------------ plumbing

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(fn: Callable[[Any, grpc.ServicerContext], Any], module: Any, req: str, resp: str, write: bool) -> Any:
            # the message types are looked up on the first call, not here (see `_Module`)
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(fn, write), request_deserializer=lambda b: getattr(module, req).deserialize(b),
                response_serializer=lambda m: getattr(module, resp).serialize(m),
            )  # fmt: skip

        search_stream = grpc.unary_stream_rpc_method_handler(
            self._wrap_stream(self._search_stream),
            request_deserializer=lambda b: gas.SearchGoogleAdsStreamRequest.deserialize(b),
            response_serializer=lambda m: gas.SearchGoogleAdsStreamResponse.serialize(m),
        )  # fmt: skip
        return [
            grpc.method_handlers_generic_handler(f"{API}.UserListService", {
                "MutateUserLists": unary(self._mutate_user_lists, uls, "MutateUserListsRequest",
                                         "MutateUserListsResponse", True)}),
            grpc.method_handlers_generic_handler(f"{API}.OfflineUserDataJobService", {
                "CreateOfflineUserDataJob": unary(self._create_job, ojs, "CreateOfflineUserDataJobRequest",
                                                  "CreateOfflineUserDataJobResponse", True),
                "AddOfflineUserDataJobOperations": unary(self._add_ops, ojs, "AddOfflineUserDataJobOperationsRequest",
                                                         "AddOfflineUserDataJobOperationsResponse", True),
                "RunOfflineUserDataJob": grpc.unary_unary_rpc_method_handler(
                    self._wrap(self._run_job, True),
                    request_deserializer=lambda b: ojs.RunOfflineUserDataJobRequest.deserialize(b),
                    response_serializer=operations_pb2.Operation.SerializeToString),
            }),
            grpc.method_handlers_generic_handler(f"{API}.GoogleAdsService", {
                "Search": unary(self._search, gas, "SearchGoogleAdsRequest", "SearchGoogleAdsResponse", False),
                "SearchStream": search_stream,
            }),
            grpc.method_handlers_generic_handler("google.longrunning.Operations", {
                "GetOperation": grpc.unary_unary_rpc_method_handler(
                    self._wrap(self._get_operation, False),
                    request_deserializer=operations_pb2.GetOperationRequest.FromString,
                    response_serializer=operations_pb2.Operation.SerializeToString),
            }),
        ]  # fmt: skip

    def _check(self, context: grpc.ServicerContext, write: bool, name: str) -> None:
        md = dict(context.invocation_metadata())
        self.request_log.append({"method": name, "metadata_keys": sorted(md), "has_token": "developer-token" in md})
        self.faults.delay()
        if self.developer_token is not None and md.get("developer-token") != self.developer_token:
            raise AdsAbort("DEVELOPER_TOKEN_NOT_APPROVED", "The developer token is not valid.")
        if self.faults.throttle(write):
            raise AdsAbort("RESOURCE_TEMPORARILY_EXHAUSTED", "Too many requests; retry later.")
        code = self.faults.pick_error(write)
        if code is not None:
            raise AdsAbort(code, f"Injected {code}")
        if self.faults.drop(write):
            raise AdsAbort("TRANSIENT_ERROR", "connection reset (injected)")

    def _abort(self, context: grpc.ServicerContext, exc: AdsAbort) -> None:
        failure = errs.GoogleAdsFailure(errors=[google_ads_error(exc.name, str(exc))])
        context.set_trailing_metadata(((FAILURE_KEY, errs.GoogleAdsFailure.serialize(failure)),
                                       ("request-id", "emulator")))  # fmt: skip
        context.abort(_GRPC_CODE.get(exc.name, grpc.StatusCode.INVALID_ARGUMENT), str(exc))

    def _wrap(self, fn: Callable[[Any, grpc.ServicerContext], Any], write: bool) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                self._check(context, write, fn.__name__)
                try:
                    result = fn(request, context)
                finally:
                    with self._lock:
                        self._flush()  # reads may apply a finished job
                if write:
                    with self._lock:
                        self.write_calls += 1
                return result
            except AdsAbort as exc:
                self._abort(context, exc)
                raise  # unreachable: abort raises

        return handler

    def _wrap_stream(self, fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                self._check(context, False, "SearchStream")
                try:
                    yield from fn(request, context)
                finally:
                    with self._lock:
                        self._flush()
            except AdsAbort as exc:
                self._abort(context, exc)

        return handler

    # ------------------------------------------------------------------ user lists

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def _mutate_user_lists(self, req: uls.MutateUserListsRequest, _ctx: grpc.ServicerContext) -> Any:
        _customer(req.customer_id)
        if not req.operations:
            raise AdsAbort("REQUIRED_NONEMPTY_LIST", "operations: at least one operation is required")
        results = []
        with self._lock:
            for op in req.operations:
                if "remove" in op:
                    lid = op.remove.rsplit("/", 1)[-1]
                    if lid not in self.lists or not op.remove.startswith(f"customers/{req.customer_id}/userLists/"):
                        raise AdsAbort("RESOURCE_NOT_FOUND", f"user list {op.remove} not found")
                    self.delete_audience(lid)
                    results.append(uls.MutateUserListResult(resource_name=op.remove))
                    continue
                if "create" not in op:
                    raise AdsAbort("REQUIRED", "operations: create or remove is required (update is not emulated)")
                new = op.create
                if not new.name:
                    raise AdsAbort("REQUIRED", "user_list.name is required")
                if any(e["list"].get("name") == new.name for e in self.lists.values()):
                    raise AdsAbort("NAME_ALREADY_USED", "A user list with this name already exists.")
                if new.membership_life_span > MAX_MEMBERSHIP_DAYS:
                    raise AdsAbort("INVALID_VALUE", f"user_list.membership_life_span may be at most {MAX_MEMBERSHIP_DAYS}")
                if "lookalike_user_list" in new:
                    self._check_lookalike(new)
                elif "crm_based_user_list" not in new:
                    raise AdsAbort("REQUIRED", "user_list: crm_based_user_list or lookalike_user_list is required")
                lid = self._new_id()
                new.id = int(lid)
                new.resource_name = f"customers/{req.customer_id}/userLists/{lid}"
                new.membership_status = ul_res.UserList.meta.fields["membership_status"].enum.OPEN
                doc = json.loads(ul_res.UserList.to_json(new))
                self._put_list(lid, doc)
                self._record({"op": "list", "id": lid, "list": doc, "next_id": self._next_id})
                results.append(uls.MutateUserListResult(resource_name=new.resource_name))
        return uls.MutateUserListsResponse(results=results)

    def _seed_size(self, seed: str) -> int | None:
        if seed in self.lists:
            return self.member_count(seed)
        return self.seed_sizes(seed) if self.seed_sizes else None

    def _check_lookalike(self, new: ul_res.UserList) -> None:
        info = new.lookalike_user_list
        for seed in info.seed_user_list_ids:
            if self._seed_size(str(seed)) is None:
                raise AdsAbort("SEED_LIST_DOES_NOT_EXIST", f"seed user list {seed} does not exist")
        key = (sorted(info.seed_user_list_ids), int(info.expansion_level), sorted(info.country_codes))
        for e in self.lists.values():
            other = e["list"].get("lookalikeUserList")
            if other and (sorted(int(s) for s in other.get("seedUserListIds", [])),
                          _expansion(other.get("expansionLevel")), sorted(other.get("countryCodes", []))) == key:  # fmt: skip
                raise AdsAbort("DUPLICATE_LOOKALIKE", "A lookalike with the same seed, expansion and countries exists")

    # ------------------------------------------------------------------ jobs

    def _create_job(self, req: ojs.CreateOfflineUserDataJobRequest, _ctx: grpc.ServicerContext) -> Any:
        _customer(req.customer_id)
        if not self.allowlisted:
            raise AdsAbort("CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE",
                           "The customer is not allowlisted for Customer Match uploads through the Google Ads API.")  # fmt: skip
        if int(req.job.type_) not in JOB_TYPES:
            raise AdsAbort("INVALID_USER_LIST_TYPE", "job.type must be CUSTOMER_MATCH_USER_LIST or "
                                                     "CUSTOMER_MATCH_WITH_ATTRIBUTES")  # fmt: skip
        meta = req.job.customer_match_user_list_metadata
        if not meta.user_list:
            raise AdsAbort("REQUIRED", "job.customer_match_user_list_metadata.user_list is required")
        lid = meta.user_list.rsplit("/", 1)[-1]
        with self._lock:
            if lid not in self.lists or not meta.user_list.startswith(f"customers/{req.customer_id}/userLists/"):
                raise AdsAbort("INVALID_USER_LIST_ID", f"user list {meta.user_list} does not exist for this customer")
            if "lookalike_user_list" in self.user_list(lid):
                raise AdsAbort("INVALID_USER_LIST_TYPE", "members can only be uploaded to CRM-based user lists")
            jid = self._new_id()
            name = f"customers/{req.customer_id}/offlineUserDataJobs/{jid}"
            consent = ojs.CreateOfflineUserDataJobRequest.pb(req).job.customer_match_user_list_metadata.consent
            self.jobs[name] = {"list": lid, "status": "PENDING", "kind": None, "ops": [], "run_at": None,
                               "consent_denied": consent.ad_user_data == CONSENT_DENIED, "failed": False,
                               "type": int(req.job.type_)}  # fmt: skip
            self._record({"op": "next_id", "id": "", "next_id": self._next_id})
        return ojs.CreateOfflineUserDataJobResponse(resource_name=name)

    def _add_ops(self, req: ojs.AddOfflineUserDataJobOperationsRequest, _ctx: grpc.ServicerContext) -> Any:
        name = req.resource_name
        if not name:
            raise AdsAbort("REQUIRED", "resource_name is required")
        pb = ojs.AddOfflineUserDataJobOperationsRequest.pb(req)
        if not pb.operations:
            raise AdsAbort("REQUIRED_NONEMPTY_LIST", "operations: at least one operation is required")
        with self._lock:
            job = self.jobs.get(name)
            if job is None:
                raise AdsAbort("RESOURCE_NOT_FOUND", "offline user data job not found")
            if name in self._busy:
                raise AdsAbort("CONCURRENT_MODIFICATION", "Another request is modifying this job.")
            self._busy.add(name)
        try:
            time.sleep(0.001)  # widen the window in which a parallel call is detected
            ops = list(pb.operations)
            start = 0
            if ops[0].WhichOneof("operation") == "remove_all":
                # remove_all must open the job; creates may follow it (Google's replace recipe)
                if job["ops"]:
                    raise AdsAbort("CONFLICTING_OPERATION", "remove_all must be the first operation of a job.")
                with self._lock:
                    job["ops"].append(("remove_all", None, None))
                start = 1
            kinds = set()
            total = 0
            for i in range(start, len(ops)):
                kind = ops[i].WhichOneof("operation")
                if kind is None:
                    raise AdsAbort("REQUIRED", f"operations[{i}]: create, remove or remove_all is required")
                if kind == "remove_all":
                    raise AdsAbort("CONFLICTING_OPERATION", "remove_all must be the first operation of a job.")
                kinds.add(kind)
                total += len((ops[i].create if kind == "create" else ops[i].remove).user_identifiers)
            if len(kinds) > 1 or (job["kind"] and kinds and job["kind"] not in kinds):
                raise AdsAbort("CONFLICTING_OPERATION", "Create and remove operations cannot be mixed in one job.")
            if job["status"] != "PENDING":
                raise AdsAbort("JOB_ALREADY_STARTED", "The job was already run.")
            if total > MAX_IDENTIFIERS_PER_REQUEST:
                raise AdsAbort("TOO_MANY_USER_IDENTIFIERS", f"at most {MAX_IDENTIFIERS_PER_REQUEST} identifiers a request")
            errors: list[errs.GoogleAdsError] = []
            accepted = []
            for i in range(start, len(ops)):
                create = ops[i].WhichOneof("operation") == "create"
                ud = ops[i].create if create else ops[i].remove
                # the attribute's own refusal first: it names what is wrong for an attribute job
                micros, why = self._read_attribute(ud, job, create)
                key: Key = b""
                if why is None:
                    key, why = self._read_user(ud, job, create)
                if why is not None:
                    errors.append(google_ads_error(why[0], why[1], index=i))
                else:
                    accepted.append(("create" if create else "remove", key, micros))
            if errors and not req.enable_partial_failure:
                raise AdsAbort(_name(errors[0]), errors[0].message)
            with self._lock:
                job["kind"] = job["kind"] or (next(iter(kinds)) if kinds else None)
                job["ops"].extend(accepted)
            resp = ojs.AddOfflineUserDataJobOperationsResponse()
            if errors:
                failure = errs.GoogleAdsFailure(errors=errors)
                from google.protobuf import any_pb2

                detail = any_pb2.Any()
                detail.Pack(errs.GoogleAdsFailure.pb(failure))
                resp.partial_failure_error = status_pb2.Status(code=3, message="partial failure", details=[detail])
            return resp
        finally:
            with self._lock:
                self._busy.discard(name)

    @staticmethod
    def _read_user(ud: Any, job: dict[str, Any], create: bool) -> tuple[Key, tuple[str, str] | None]:
        """One operation's UserData (a raw protobuf message) as its member key, or why the platform refuses it."""
        idents = ud.user_identifiers
        if not idents:
            return b"", ("MISSING_USER_IDENTIFIER", "a UserData needs at least one user identifier")
        if len(idents) > MAX_IDENTIFIERS_PER_USER:
            return b"", ("TOO_MANY_USER_IDENTIFIERS", f"at most {MAX_IDENTIFIERS_PER_USER} identifiers per UserData")
        match = _HEX64.fullmatch
        bad_hash = ("INVALID_SHA256_FORMAT", "hashed values must be SHA-256 lowercase hex")
        pieces: list[str] = []
        for ident in idents:
            kind = ident.WhichOneof("identifier")
            if kind == "hashed_email":
                v = ident.hashed_email
                if not match(v):
                    return b"", bad_hash
                pieces.append(_EMAIL + v)
            elif kind == "hashed_phone_number":
                v = ident.hashed_phone_number
                if not match(v):
                    return b"", bad_hash
                pieces.append(_PHONE + v)
            elif kind == "address_info":
                a = ident.address_info
                first, last, country, postal = a.hashed_first_name, a.hashed_last_name, a.country_code, a.postal_code
                if not (first and last and country and postal):
                    return b"", ("REQUIRED", "address_info needs hashed_first_name, hashed_last_name, country_code and "
                                             "postal_code")  # fmt: skip
                if not (match(first) and match(last)):
                    return b"", bad_hash
                pieces += [keys.google_piece("first_name", first), keys.google_piece("last_name", last),
                           keys.google_piece("country_code", country), keys.google_piece("postal_code", postal)]  # fmt: skip
            else:
                return b"", ("INCOMPATIBLE_UPLOAD_KEY_TYPE", f"{kind} does not fit a CONTACT_INFO list")
        if create:
            denied = ud.consent.ad_user_data == CONSENT_DENIED if ud.HasField("consent") else job["consent_denied"]
            if denied:
                return b"", ("CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS", "ad_user_data consent is DENIED")
        return keys.google_key(pieces), None

    @staticmethod
    def _read_attribute(ud: Any, job: dict[str, Any], create: bool) -> tuple[int | None, tuple[str, str] | None]:
        """One UserData's lifetime value in micros (None: none), or why the platform refuses its attribute."""
        if not ud.HasField("user_attribute"):
            return None, None
        if job["type"] != CUSTOMER_MATCH_WITH_ATTRIBUTES:
            # "User attribute, can only be used with CUSTOMER_MATCH_WITH_ATTRIBUTES job type"
            return None, ("ATTRIBUTES_NOT_APPLICABLE_FOR_CUSTOMER_MATCH_USER_LIST",
                          "user attributes cannot be uploaded in a CUSTOMER_MATCH_USER_LIST job")  # fmt: skip
        if any(ident.WhichOneof("identifier") not in CONTACT_INFO for ident in ud.user_identifiers):
            return None, ("INCOMPATIBLE_USER_IDENTIFIER_FOR_ATTRIBUTES",
                          "user attributes can only be provided with contact info (email, phone, address)")  # fmt: skip
        attr = ud.user_attribute
        if attr.HasField("lifetime_value_bucket"):
            bucket = attr.lifetime_value_bucket
            if not (1 <= bucket <= 10 or (bucket == 0 and not create)):
                return None, ("LIFETIME_VALUE_BUCKET_NOT_IN_RANGE",
                              "lifetime_value_bucket must be 1 (low) to 10 (high); 0 only on remove")  # fmt: skip
        return (int(attr.lifetime_value_micros) if attr.HasField("lifetime_value_micros") else None), None

    def _run_job(self, req: ojs.RunOfflineUserDataJobRequest, _ctx: grpc.ServicerContext) -> Any:
        if not req.resource_name:
            raise AdsAbort("REQUIRED", "resource_name is required")
        with self._lock:
            job = self.jobs.get(req.resource_name)
            if job is None:
                raise AdsAbort("RESOURCE_NOT_FOUND", "offline user data job not found")
            if job["status"] != "PENDING":
                raise AdsAbort("JOB_ALREADY_STARTED", "The job was already run.")
            running = [n for n, j in self.jobs.items() if j["list"] == job["list"] and self._status(j) == "RUNNING"]
            if running:
                raise AdsAbort("CONCURRENT_MODIFICATION", "Another job is running on this user list.")
            job["status"], job["run_at"] = "RUNNING", self.clock.time()
            job["failed"] = self.faults.fails_request()
            self._status(job)
        return operations_pb2.Operation(name=f"operations/{req.resource_name}", done=False)

    def _status(self, job: dict[str, Any]) -> str:
        """Jobs finish `processing_delay_seconds` after they were run; applied exactly once (or FAILED: not at all)."""
        if job["status"] == "RUNNING" and self.clock.time() >= job["run_at"] + self.processing_delay_seconds:
            lid = job["list"]
            if job["failed"] or lid not in self.lists:
                job["status"] = "FAILED"
                return "FAILED"
            members, values = self.lists[lid]["members"], self.lists[lid]["values"]
            now = self.clock.time()
            added: list[Key] = []
            worth: list[int | None] = []
            removed: list[Key] = []
            for kind, key, micros in job["ops"]:
                if kind == "remove_all":
                    if added or removed or members:
                        self._record({"op": "clear", "id": lid})
                    members.clear()
                    values.clear()
                    added, worth, removed = [], [], []
                elif kind == "create":
                    added.append(key)
                    worth.append(micros)
                else:
                    removed.append(key)
            self._put_members(lid, added, now)
            values.update((k, v) for k, v in zip(added, worth, strict=True) if v is not None)
            for key in removed:
                members.pop(key, None)
                values.pop(key, None)
            if added:
                self._record({"op": "add", "id": lid, "t": now}, self._table(added, worth))
            if removed:
                self._record({"op": "del", "id": lid}, self._table(removed))
            job["ops"] = []
            job["status"] = "SUCCESS"
        return str(job["status"])

    def _get_operation(self, req: operations_pb2.GetOperationRequest, _ctx: grpc.ServicerContext) -> Any:
        name = req.name.removeprefix("operations/")
        with self._lock:
            job = self.jobs.get(name)
            done = job is not None and self._status(job) in ("SUCCESS", "FAILED")
        op = operations_pb2.Operation(name=req.name, done=done)
        if done:
            op.response.Pack(empty_pb2.Empty())
        return op

    # ------------------------------------------------------------------ GAQL

    def _rows(self, query: str) -> list[gas.GoogleAdsRow]:
        q = " ".join(query.split())
        with self._lock:
            m = re.search(r"FROM user_list WHERE user_list\.(name|id) = '?([^']+?)'?$", q)
            if m:
                field, value = m.groups()
                out = []
                for lid, e in self.lists.items():
                    if (field == "id" and lid == value) or (field == "name" and e["list"].get("name") == value):
                        ul = ul_res.UserList.from_json(json.dumps(e["list"]))
                        self._expire(lid)
                        n = len(e["members"]) if "lookalike_user_list" not in ul else 0
                        ul.size_for_search = ul.size_for_display = n
                        ul.match_rate_percentage = 100 if n else 0
                        out.append(gas.GoogleAdsRow(user_list=ul))
                return out
            m = re.search(r"FROM offline_user_data_job WHERE offline_user_data_job\.resource_name = '([^']+)'", q)
            if m:
                job = self.jobs.get(m.group(1))
                if job is None:
                    return []
                state = self._status(job)
                row = ouj.OfflineUserDataJob(resource_name=m.group(1), status=_job_status(state))
                if state == "FAILED":
                    row.failure_reason = ouj.OfflineUserDataJob.meta.fields["failure_reason"].enum.UNKNOWN
                return [gas.GoogleAdsRow(offline_user_data_job=row)]
            m = re.search(r"FROM offline_user_data_job WHERE offline_user_data_job\.status = '(\w+)' "
                          r"AND offline_user_data_job\.type (?:= '(\w+)'|IN \(([\w', ]+)\))$", q)  # fmt: skip
            if m:
                types = {m.group(2)} if m.group(2) else {t.strip(" '") for t in m.group(3).split(",")}
                out = []
                for name, job in self.jobs.items():
                    state = self._status(job)
                    if state != m.group(1) or JOB_TYPES[job["type"]] not in types:
                        continue
                    cid = name.split("/")[1]
                    j = ouj.OfflineUserDataJob(resource_name=name, status=_job_status(state))
                    j.customer_match_user_list_metadata.user_list = f"customers/{cid}/userLists/{job['list']}"
                    out.append(gas.GoogleAdsRow(offline_user_data_job=j))
                return out
        raise AdsAbort("INTERNAL_ERROR", "query shape not supported by the emulator")

    def _search(self, req: gas.SearchGoogleAdsRequest, _ctx: grpc.ServicerContext) -> Any:
        return gas.SearchGoogleAdsResponse(results=self._rows(req.query))

    def _search_stream(self, req: gas.SearchGoogleAdsStreamRequest, _ctx: grpc.ServicerContext) -> Any:
        yield gas.SearchGoogleAdsStreamResponse(results=self._rows(req.query))


def _customer(customer_id: str) -> None:
    if not customer_id or not customer_id.isdigit():
        raise AdsAbort("INVALID_CUSTOMER_ID", f"customer_id must be digits without dashes, got {customer_id!r}")


def _expansion(value: Any) -> int:
    names = {"NARROW": 2, "BALANCED": 3, "BROAD": 4}
    return names.get(value, 0) if isinstance(value, str) else int(value or 0)


def _job_status(state: str) -> Any:
    return getattr(job_status_enum.OfflineUserDataJobStatusEnum.OfflineUserDataJobStatus, state)


def _name(err: errs.GoogleAdsError) -> str:
    ec = err.error_code
    field = errs.ErrorCode.pb(ec).WhichOneof("error_code")
    return str(getattr(ec, field).name)


def start_google_ads_emulator(state_file: Path | None = None, **kwargs: Any) -> GoogleAdsEmulator:
    emu = GoogleAdsEmulator(state_file=state_file, **kwargs)
    emu.start()
    return emu
