"""Emulator of the Google Data Manager API (REST) subset used for Customer Match, on loopback.

Requests are parsed with the official client's own message types (`google.ads.datamanager_v1`)
from the JSON it sends (camelCase; enums as numbers or names), and answers are written with them,
so the emulator accepts exactly what the real client sends. Enforced like the real API: at most
10,000 audience members a request, `encoding` required for hashed data, 64-hex hashes, every
member's identifiers describe one person (one AudienceMember), the destination list must exist,
consent DENIED for ad_user_data means the record is not ingested (reported in the request
status), `removeAll` honours `removeAsOfTime`. Errors are Google JSON error bodies
(``{"error": {"code", "message", "status"}}``) that the client maps to `google.api_core`
exceptions. Request status is SUCCESS at once, or PROCESSING for `processing_delay_seconds`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from google.ads import datamanager_v1 as dm
from google.protobuf import json_format

from connector.sandbox.base import HttpEmulator
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.server import DropConnection, HttpRequest, HttpResponse

MAX_MEMBERS = 10_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LISTS = re.compile(r"^/v1/accountTypes/([^/]+)/accounts/([^/]+)/userLists(?:/([^/:]+))?$")
_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
         "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500,
         "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}  # fmt: skip
ACCOUNT_TYPES = {"1": "GOOGLE_ADS", "GOOGLE_ADS": "GOOGLE_ADS"}


class ApiError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> HttpResponse:
        code = _HTTP.get(self.status, 400)
        return HttpResponse(code, {"error": {"code": code, "message": str(self), "status": self.status}})


def _member_row(m: dm.AudienceMember) -> frozenset[tuple[str, str]]:
    """One AudienceMember as (key, value) pairs in `connector`'s Google payload keys."""
    row: list[tuple[str, str]] = []
    for ident in m.user_data.user_identifiers:
        kind = dm.UserIdentifier.pb(ident).WhichOneof("identifier")
        if kind == "email_address":
            row.append(("email", ident.email_address))
        elif kind == "phone_number":
            row.append(("phone", ident.phone_number))
        elif kind == "address":
            a = ident.address
            row += [("first_name", a.given_name), ("last_name", a.family_name),
                    ("country_code", a.region_code), ("postal_code", a.postal_code)]  # fmt: skip
    return frozenset(row)


class DataManagerEmulator(HttpEmulator):
    def __init__(self, *, state_file: Path | None = None, faults: FaultKnobs | None = None,
                 processing_delay_seconds: float = 0.0, auth_token: str | None = None, port: int = 0) -> None:  # fmt: skip
        self.state_file = state_file
        self.faults = faults or FaultKnobs()
        self.processing_delay_seconds = processing_delay_seconds
        self.auth_token = auth_token
        # list id -> {"list": UserList JSON dict, "members": {row: ingest_time}}
        self.lists: dict[str, dict[str, Any]] = {}
        self.requests: dict[str, dict[str, Any]] = {}
        self.request_log: list[dict[str, Any]] = []
        self.write_calls = 0
        self._lock = threading.RLock()
        self._serve(port)
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        data = self._read_state() or {}
        for lid, entry in data.get("lists", {}).items():
            members = {frozenset(tuple(p) for p in row): t for row, t in entry["members"]}
            self.lists[lid] = {"list": entry["list"], "members": members}

    def _state(self) -> dict[str, Any]:
        return {"lists": {lid: {"list": e["list"], "members": [[sorted(r), t] for r, t in e["members"].items()]}
                          for lid, e in self.lists.items()}}  # fmt: skip

    # ------------------------------------------------------------------ inspection

    def members(self, list_id: str) -> set[frozenset[tuple[str, str]]]:
        with self._lock:
            return set(self.lists[list_id]["members"])

    # ------------------------------------------------------------------ handling

    def handle(self, req: HttpRequest) -> HttpResponse:
        write = req.method in ("POST", "PATCH", "DELETE")
        self.request_log.append({"method": req.method, "path": req.path, "query": dict(req.query),
                                 "headers": dict(req.headers), "body": self._log_body(req.body)})  # fmt: skip
        self.faults.delay()
        try:
            if self.auth_token is not None and req.headers.get("authorization") != f"Bearer {self.auth_token}":
                raise ApiError("UNAUTHENTICATED", "Request had invalid authentication credentials.")
            if self.faults.drop(write) and not self.faults.drop_after_apply:
                raise DropConnection()
            if self.faults.throttle(write):
                raise ApiError("RESOURCE_EXHAUSTED", "Too many requests: retry later (rate limit)")
            code = self.faults.pick_error(write)
            if code is not None:
                raise ApiError(code, f"Injected {code}")
            with self._lock:
                body = self._route(req)
                if write:
                    self.write_calls += 1
                    self._save()
            if write and self.faults.drop_after_apply and self.faults.drop(write):
                raise DropConnection()
            return HttpResponse(200, body)
        except ApiError as exc:
            return exc.response()

    def _route(self, req: HttpRequest) -> Any:
        path = req.path
        if req.method == "POST" and path == "/v1/audienceMembers:ingest":
            return self._ingest(dm.IngestAudienceMembersRequest.from_json(req.body or b"{}", ignore_unknown_fields=True))
        if req.method == "POST" and path == "/v1/audienceMembers:remove":
            return self._remove(dm.RemoveAudienceMembersRequest.from_json(req.body or b"{}", ignore_unknown_fields=True))
        if req.method == "POST" and path == "/v1/audienceMembers:removeAll":
            return self._remove_all(
                dm.RemoveAllAudienceMembersRequest.from_json(req.body or b"{}", ignore_unknown_fields=True)
            )
        if req.method == "GET" and path == "/v1/requestStatus:retrieve":
            return self._status((req.query.get("requestId") or req.query.get("request_id") or [""])[0])
        m = _LISTS.match(path)
        if m:
            account_type, account, list_id = m.groups()
            if ACCOUNT_TYPES.get(account_type) is None:
                raise ApiError("INVALID_ARGUMENT", f"unsupported account type {account_type}")
            if req.method == "POST" and list_id is None:
                return self._create_list(account, req.body)
            if req.method == "GET" and list_id is None:
                return self._list_lists(account)
            if req.method == "GET" and list_id:
                return self._get_list(account, list_id)
        raise ApiError("NOT_FOUND", f"{req.method} {path} is not part of the emulated API")

    # ------------------------------------------------------------------ user lists

    def _create_list(self, account: str, body: bytes) -> Any:
        ul = dm.UserList.from_json(body or b"{}", ignore_unknown_fields=True)
        if not ul.display_name:
            raise ApiError("INVALID_ARGUMENT", "user_list.display_name is required")
        for e in self.lists.values():
            if e["list"]["account"] == account and e["list"]["displayName"] == ul.display_name:
                raise ApiError("ALREADY_EXISTS", "a user list with this name already exists (NAME_ALREADY_USED)")
        days = ul.membership_duration.total_seconds() / 86400 if ul.membership_duration else 540
        if days > 540:
            raise ApiError("INVALID_ARGUMENT", "membership_duration may be at most 540 days")
        lid = str(9_000_000_000 + len(self.lists) + 1)
        ul.id = int(lid)
        ul.name = f"accountTypes/GOOGLE_ADS/accounts/{account}/userLists/{lid}"
        ul.membership_status = dm.UserList.MembershipStatus.OPEN
        stored = json.loads(dm.UserList.to_json(ul))
        stored["account"] = account
        self.lists[lid] = {"list": stored, "members": {}}
        return self._list_json(lid)

    def _list_json(self, lid: str) -> Any:
        e = self.lists[lid]
        doc = {k: v for k, v in e["list"].items() if k != "account"}
        n = len(e["members"])
        doc["sizeInfo"] = {"displayNetworkMembersCount": str(n), "searchNetworkMembersCount": str(n)}
        doc["ingestedUserListInfo"] = {"uploadKeyTypes": ["CONTACT_ID"],
                                       "contactIdInfo": {"matchRatePercentage": 100 if n else 0}}  # fmt: skip
        return doc

    def _get_list(self, account: str, lid: str) -> Any:
        e = self.lists.get(lid)
        if e is None or e["list"]["account"] != account:
            raise ApiError("NOT_FOUND", f"user list {lid} not found")
        return self._list_json(lid)

    def _list_lists(self, account: str) -> Any:
        return {"userLists": [self._list_json(lid) for lid, e in self.lists.items() if e["list"]["account"] == account]}

    # ------------------------------------------------------------------ members

    def _target(self, destinations: Any) -> str:
        if len(destinations) != 1:
            raise ApiError("INVALID_ARGUMENT", "exactly one destination is supported by the emulator")
        d = destinations[0]
        lid = str(d.product_destination_id)
        e = self.lists.get(lid)
        if e is None or e["list"]["account"] != d.operating_account.account_id:
            raise ApiError("NOT_FOUND", f"destination user list {lid} not found for the operating account")
        return lid

    def _check_members(self, members: Any, encoding: int) -> None:
        if len(members) > MAX_MEMBERS:
            raise ApiError("INVALID_ARGUMENT", f"too many audience members: at most {MAX_MEMBERS} per request")
        if not members:
            raise ApiError("INVALID_ARGUMENT", "audience_members must not be empty")
        if encoding != dm.Encoding.HEX and encoding != dm.Encoding.BASE64:
            raise ApiError("INVALID_ARGUMENT", "encoding is required for hashed user data")
        for i, m in enumerate(members):
            for ident in m.user_data.user_identifiers:
                kind = dm.UserIdentifier.pb(ident).WhichOneof("identifier")
                values = ([ident.email_address] if kind == "email_address" else [ident.phone_number]
                          if kind == "phone_number" else [ident.address.given_name, ident.address.family_name])  # fmt: skip
                if any(not _HEX64.match(v) for v in values):
                    raise ApiError("INVALID_ARGUMENT", f"audience_members[{i}]: hashed values must be SHA-256 hex "
                                   "(INVALID_SHA256_FORMAT)")  # fmt: skip
            if not m.user_data.user_identifiers:
                raise ApiError("INVALID_ARGUMENT", f"audience_members[{i}] has no user identifier")

    def _new_request(self, kind: str, lid: str, records: int, errors: dict[str, int]) -> str:
        rid = uuid.uuid4().hex
        self.requests[rid] = {"kind": kind, "list": lid, "records": records, "errors": errors,
                              "ready_at": time.time() + self.processing_delay_seconds}  # fmt: skip
        return rid

    def _ingest(self, r: dm.IngestAudienceMembersRequest) -> Any:
        lid = self._target(r.destinations)
        self._check_members(r.audience_members, r.encoding)
        now = time.time()
        denied = 0
        for m in r.audience_members:
            consent = m.consent if "consent" in m else r.consent
            if consent.ad_user_data == dm.ConsentStatus.CONSENT_DENIED:
                denied += 1  # like the real API: accepted, not ingested, reported as DENIED_CONSENT
                continue
            self.lists[lid]["members"][_member_row(m)] = now
        errors = {"PROCESSING_ERROR_REASON_DENIED_CONSENT": denied} if denied else {}
        rid = self._new_request("ingest", lid, len(r.audience_members), errors)
        return {"requestId": rid}

    def _remove(self, r: dm.RemoveAudienceMembersRequest) -> Any:
        lid = self._target(r.destinations)
        self._check_members(r.audience_members, r.encoding)
        rows = self.lists[lid]["members"]
        for m in r.audience_members:
            rows.pop(_member_row(m), None)
        return {"requestId": self._new_request("remove", lid, len(r.audience_members), {})}

    def _remove_all(self, r: dm.RemoveAllAudienceMembersRequest) -> Any:
        lid = self._target(r.destinations)
        cutoff = r.remove_as_of_time.timestamp() if "remove_as_of_time" in r else time.time()
        rows = self.lists[lid]["members"]
        for row in [row for row, t in rows.items() if t < cutoff]:
            del rows[row]
        return {"requestId": self._new_request("remove_all", lid, 0, {})}

    def _status(self, rid: str) -> Any:
        req = self.requests.get(rid)
        if req is None:
            raise ApiError("NOT_FOUND", "request id not found")
        processing = time.time() < req["ready_at"]
        errors = req["errors"]
        state = "PROCESSING" if processing else ("PARTIAL_SUCCESS" if errors else "SUCCESS")
        status: dict[str, Any] = {
            "destination": {"productDestinationId": req["list"]},
            "requestStatus": state,
        }
        key = {"ingest": "audienceMembersIngestionStatus", "remove": "audienceMembersRemovalStatus"}.get(req["kind"])
        if key and not processing:
            inner = "userDataIngestionStatus" if req["kind"] == "ingest" else "userDataRemovalStatus"
            status[key] = {inner: {"recordCount": str(req["records"])}}
        if errors and not processing:
            status["errorInfo"] = {"errorCounts": [{"recordCount": str(n), "reason": reason}
                                                   for reason, n in errors.items()]}  # fmt: skip
        # validate against the client's own types before answering
        json_format.Parse(json.dumps({"requestStatusPerDestination": [status]}),
                          dm.RetrieveRequestStatusResponse.pb(dm.RetrieveRequestStatusResponse()))  # fmt: skip
        return {"requestStatusPerDestination": [status]}


def start_datamanager_emulator(state_file: Path | None = None, **kwargs: Any) -> DataManagerEmulator:
    emu = DataManagerEmulator(state_file=state_file, **kwargs)
    emu.start()
    return emu
