"""Emulator of the Google Data Manager API (REST) subset used for Customer Match, on loopback.

Request bodies are read as the official client sends them (camelCase JSON, enums as numbers or names)
and checked against the client's own message descriptors: unknown names, two members of a oneof and
bad enum values are refused with Google's JSON error body (``{"error": {"code", "message", "status",
"details"}}``, which the client maps to `google.api_core` exceptions). Enforced like the real API:
- ingest: `destinations` and `audienceMembers` required, at most 10,000 members, `encoding` required
  for hashed user data, `termsOfService.customerMatchTermsOfServiceStatus` ACCEPTED (the Customer
  Match terms, https://support.google.com/adspolicy/answer/6299717), hashes are SHA-256 in the
  declared encoding (HEX: 64 lowercase hex), every member one person (one AudienceMember, at most 10
  identifiers), the destination list exists under the operating account;
- consent is stored per member (member-level overrides request-level); `ad_user_data` DENIED means
  the member is not ingested (reported as DENIED_CONSENT in the request status);
- `removeAll` honours `removeAsOfTime`; lists can be deleted (`DELETE .../userLists/{id}`);
- members older than the list's `membershipDuration` drop out (by the emulator's clock);
- request status is PROCESSING for `processing_delay_seconds`, then SUCCESS / PARTIAL_SUCCESS, or
  FAILED with nothing applied (`faults.failed_request_rate`).

Members are held in a dict per list: the member's identifiers packed into a `bytes` key
(`connector.sandbox.members`), its ingest time (microseconds) and consent packed into one int, so adding
or removing 10,000 members is 10,000 dict operations; each call that changes something appends one
journal frame of its own rows.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
from google.ads import datamanager_v1 as dm
from google.protobuf import json_format

from connector.clock import SYSTEM_CLOCK, Clock
from connector.sandbox import members as keys
from connector.sandbox import protojson
from connector.sandbox.base import HttpEmulator
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.server import DropConnection, HttpRequest, HttpResponse

MAX_MEMBERS = 10_000
MAX_IDENTIFIERS = 10
MAX_MEMBERSHIP_DAYS = 540
REQUEST_STATUS_KEPT_SECONDS = 30 * 86400
TERMS_URL = "https://support.google.com/adspolicy/answer/6299717"
_HEX64 = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
_LISTS = re.compile(r"^/v1/accountTypes/([^/]+)/accounts/([^/]+)/userLists(?:/([^/:]+))?$")
_HTTP = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
         "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500,
         "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}  # fmt: skip
ACCOUNT_TYPES = {"1": "GOOGLE_ADS", "GOOGLE_ADS": "GOOGLE_ADS"}
HEX, BASE64 = int(dm.Encoding.HEX), int(dm.Encoding.BASE64)
GRANTED, DENIED = int(dm.ConsentStatus.CONSENT_GRANTED), int(dm.ConsentStatus.CONSENT_DENIED)
ACCEPTED = int(dm.TermsOfServiceStatus.ACCEPTED)
GOOGLE_ADS = int(dm.ProductAccount.AccountType.GOOGLE_ADS)
_INGEST = dm.IngestAudienceMembersRequest.pb().DESCRIPTOR
_REMOVE = dm.RemoveAudienceMembersRequest.pb().DESCRIPTOR
_REMOVE_ALL = dm.RemoveAllAudienceMembersRequest.pb().DESCRIPTOR
_USER_LIST = dm.UserList.pb().DESCRIPTOR
_ADDRESS_KEYS = (("givenName", "first_name", True), ("familyName", "last_name", True),
                 ("regionCode", "country_code", False), ("postalCode", "postal_code", False))  # fmt: skip
_EMAIL, _PHONE = keys.google_piece("email", ""), keys.google_piece("phone", "")  # the tags' hex text

Row = frozenset[tuple[str, str]]


def _us(t: float) -> int:
    """A time in whole microseconds, as members' ingest times are kept."""
    return round(t * 1_000_000)


def _stamp(t_us: int, ad_user_data: int, ad_personalization: int) -> int:
    """A member's ingest time and consent (ConsentStatus numbers, 0-2) as one int: a dict of ints is never
    tracked by the garbage collector, a dict of tuples is."""
    return t_us << 4 | ad_user_data << 2 | ad_personalization


class ApiError(Exception):
    def __init__(self, status: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field

    def response(self) -> HttpResponse:
        code = _HTTP.get(self.status, 400)
        error: dict[str, Any] = {"code": code, "message": str(self), "status": self.status}
        if self.field is not None:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                 "fieldViolations": [{"field": self.field, "description": str(self)}]}]  # fmt: skip
        return HttpResponse(code, {"error": error})


def _invalid(message: str, field: str) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message, field)


def _duration_seconds(value: Any) -> float:
    """A proto3 JSON Duration ("46656000s")."""
    if value in (None, ""):
        return MAX_MEMBERSHIP_DAYS * 86400.0
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            pass
    raise _invalid(f"Invalid value at 'user_list.membership_duration' ({value!r}): expected a duration like \"86400s\"",
                   "user_list.membership_duration")  # fmt: skip


class DataManagerEmulator(HttpEmulator):
    def __init__(self, *, state_file: Path | None = None, faults: FaultKnobs | None = None,
                 processing_delay_seconds: float = 0.0, auth_token: str | None = None, port: int = 0,
                 clock: Clock | None = None) -> None:  # fmt: skip
        self.state_file = state_file
        self.faults = faults or FaultKnobs()
        self.processing_delay_seconds = processing_delay_seconds
        self.auth_token = auth_token
        self.clock = clock or SYSTEM_CLOCK
        # list id -> {"list": UserList JSON, "members": {key: _stamp(ingested at, ad_user_data, ad_personalization)},
        #             "ttl": membership seconds, "oldest": a lower bound of the members' ingest times (µs)}
        self.lists: dict[str, dict[str, Any]] = {}
        self.requests: dict[str, dict[str, Any]] = {}
        self.request_log: list[dict[str, Any]] = []
        self.write_calls = 0
        self._next_id = 9_000_000_000
        self._lock = threading.RLock()
        self._serve(port)
        self._load_state()
        if self.lists and self.faults.audience_deletion_rate > 0:
            self.between_runs()

    # ------------------------------------------------------------------ state

    MEMBERS = pa.schema([("key", pa.binary()), ("stamp", pa.int64())])

    def _table(self, members: list[bytes], stamps: list[int] | None = None) -> pa.Table:
        column = pa.array(stamps, pa.int64()) if stamps is not None else pa.nulls(len(members), pa.int64())
        return pa.table([pa.array(members, pa.binary()), column], schema=self.MEMBERS)

    def _state(self) -> tuple[dict[str, Any], dict[str, pa.Table]]:
        state = {
            "next_id": self._next_id,
            "lists": {lid: e["list"] for lid, e in self.lists.items()},
            # request statuses stay readable for a while, not forever (the state file would only grow)
            "requests": {rid: r for rid, r in self.requests.items()
                         if r["ready_at"] > self.clock.time() - REQUEST_STATUS_KEPT_SECONDS},
        }  # fmt: skip
        return state, {lid: self._table(list(e["members"]), list(e["members"].values())) for lid, e in self.lists.items()}

    def _restore(self, state: dict[str, Any], members: dict[str, pa.Table]) -> None:
        self._next_id = int(state.get("next_id", self._next_id))
        for lid, doc in state.get("lists", {}).items():
            self._put_list(lid, doc)
            self._put_rows(lid, members[lid])
        self.requests.update(state.get("requests", {}))

    def _replay(self, entry: dict[str, Any], rows: pa.Table | None) -> None:
        op = entry["op"]
        if op == "list":
            self._put_list(entry["id"], entry["list"])
        elif op == "drop":
            self.lists.pop(entry["id"], None)
        elif op == "put" and entry["list"] in self.lists and rows is not None:
            self._put_rows(entry["list"], rows)
        elif op == "del" and entry["list"] in self.lists and rows is not None:
            members = self.lists[entry["list"]]["members"]
            for key in rows.column("key").to_pylist():
                members.pop(key, None)
        elif op == "req":
            self.requests[entry["id"]] = entry["request"]

    def _put_list(self, lid: str, doc: dict[str, Any]) -> None:
        self.lists[lid] = {"list": doc, "members": {}, "ttl": _duration_seconds(doc.get("membershipDuration")),
                           "oldest": float("inf")}  # fmt: skip
        self._next_id = max(self._next_id, int(lid))

    def _put_rows(self, lid: str, rows: pa.Table) -> None:
        e = self.lists[lid]
        stamps = rows.column("stamp").to_pylist()
        e["members"].update(zip(rows.column("key").to_pylist(), stamps, strict=True))
        if stamps:
            e["oldest"] = min(e["oldest"], min(stamps) >> 4)

    # ------------------------------------------------------------------ inspection

    def members(self, list_id: str) -> set[Row]:
        with self._lock:
            self._expire(list_id)
            return {keys.google_pairs(key) for key in self.lists[list_id]["members"]}

    def member_consent(self, list_id: str) -> dict[Row, tuple[str, str]]:
        """Each member's stored consent: (ad_user_data, ad_personalization) as GRANTED / DENIED / UNSPECIFIED."""
        names = {0: "UNSPECIFIED", GRANTED: "GRANTED", DENIED: "DENIED"}
        with self._lock:
            self._expire(list_id)
            return {keys.google_pairs(key): (names[v >> 2 & 3], names[v & 3])
                    for key, v in self.lists[list_id]["members"].items()}  # fmt: skip

    def member_count(self, list_id: str) -> int | None:
        with self._lock:
            if list_id not in self.lists:
                return None
            self._expire(list_id)
            return len(self.lists[list_id]["members"])

    def _audiences(self) -> dict[str, Any]:
        return self.lists

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
            body = self._body(req) if req.method in ("POST", "PATCH") else None
            with self._lock:
                try:
                    result = self._route(req, body)
                finally:
                    self._flush()
                if write:
                    self.write_calls += 1
            if write and self.faults.drop_after_apply and self.faults.drop(write):
                raise DropConnection()
            return HttpResponse(200, result)
        except ApiError as exc:
            return exc.response()

    @staticmethod
    def _body(req: HttpRequest) -> dict[str, Any]:
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received. Unexpected token.") from None
        if not isinstance(body, dict):
            raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received. Expected an object.")
        return body

    def _route(self, req: HttpRequest, body: dict[str, Any] | None) -> Any:
        path = req.path
        if req.method == "POST" and path == "/v1/audienceMembers:ingest":
            return self._ingest(self._checked(body, _INGEST))
        if req.method == "POST" and path == "/v1/audienceMembers:remove":
            return self._remove(self._checked(body, _REMOVE))
        if req.method == "POST" and path == "/v1/audienceMembers:removeAll":
            return self._remove_all(self._checked(body, _REMOVE_ALL))
        if req.method == "GET" and path == "/v1/requestStatus:retrieve":
            return self._status((req.query.get("requestId") or req.query.get("request_id") or [""])[0])
        m = _LISTS.match(path)
        if m:
            account_type, account, list_id = m.groups()
            if ACCOUNT_TYPES.get(account_type) is None:
                raise ApiError("INVALID_ARGUMENT", f"unsupported account type {account_type}")
            if req.method == "POST" and list_id is None:
                return self._create_list(account, self._checked(body, _USER_LIST))
            if req.method == "GET" and list_id is None:
                return self._list_lists(account)
            if req.method == "GET" and list_id:
                return self._get_list(account, list_id)
            if req.method == "DELETE" and list_id:
                self._get_list(account, list_id)
                self.delete_audience(list_id)
                return {}
        raise ApiError("NOT_FOUND", f"{req.method} {path} is not part of the emulated API")

    @staticmethod
    def _checked(body: dict[str, Any] | None, desc: Any) -> dict[str, Any]:
        body = body if body is not None else {}
        try:
            protojson.check(body, desc)
        except protojson.JsonFieldError as exc:
            raise ApiError("INVALID_ARGUMENT", str(exc), exc.field) from None
        return body

    # ------------------------------------------------------------------ user lists

    def _create_list(self, account: str, ul: dict[str, Any]) -> Any:
        name = ul.get("displayName")
        if not name:
            raise _invalid("user_list.display_name is required", "user_list.display_name")
        for e in self.lists.values():
            if e["list"]["account"] == account and e["list"]["displayName"] == name:
                raise ApiError("ALREADY_EXISTS", "a user list with this name already exists (NAME_ALREADY_USED)")
        if _duration_seconds(ul.get("membershipDuration")) > MAX_MEMBERSHIP_DAYS * 86400:
            raise _invalid(f"membership_duration may be at most {MAX_MEMBERSHIP_DAYS} days",
                           "user_list.membership_duration")  # fmt: skip
        for output_only in ("id", "name", "membershipStatus", "sizeInfo"):
            ul.pop(output_only, None)
        self._next_id += 1
        lid = str(self._next_id)
        stored = {**ul, "id": lid, "name": f"accountTypes/GOOGLE_ADS/accounts/{account}/userLists/{lid}",
                  "membershipStatus": "OPEN", "account": account}  # fmt: skip
        self._put_list(lid, stored)
        self._record({"op": "list", "id": lid, "list": stored})
        return self._list_json(lid)

    def _list_json(self, lid: str) -> Any:
        self._expire(lid)
        e = self.lists[lid]
        doc = {k: v for k, v in e["list"].items() if k != "account"}
        n = len(e["members"])
        doc["sizeInfo"] = {"displayNetworkMembersCount": str(n), "searchNetworkMembersCount": str(n)}
        doc["ingestedUserListInfo"] = {**doc.get("ingestedUserListInfo", {}), "uploadKeyTypes": ["CONTACT_ID"],
                                       "contactIdInfo": {"matchRatePercentage": 100 if n else 0}}  # fmt: skip
        return doc

    def _get_list(self, account: str, lid: str) -> Any:
        e = self.lists.get(lid)
        if e is None or e["list"]["account"] != account:
            raise ApiError("NOT_FOUND", f"user list {lid} not found")
        return self._list_json(lid)

    def _list_lists(self, account: str) -> Any:
        return {"userLists": [self._list_json(lid) for lid, e in self.lists.items() if e["list"]["account"] == account]}

    def _expire(self, lid: str) -> None:
        """Members older than the list's membership duration drop out, as on the platform."""
        e = self.lists.get(lid)
        if e is None:
            return
        cutoff = _us(self.clock.time() - e["ttl"])
        if e["oldest"] >= cutoff:
            return
        members = e["members"]
        cutoff <<= 4  # a stamp's time is above its consent bits: stamps below this are older than the cutoff
        gone = [row for row, v in members.items() if v < cutoff]
        for row in gone:
            del members[row]
        e["oldest"] = min(members.values()) >> 4 if members else float("inf")
        if gone:
            self._record({"op": "del", "list": lid}, self._table(gone))

    # ------------------------------------------------------------------ members

    def _targets(self, destinations: Any) -> list[str]:
        if not destinations:
            raise _invalid("destinations is required: at least one destination", "destinations")
        lids = []
        for i, d in enumerate(destinations):
            op = d.get("operatingAccount") or {}
            if not op.get("accountId"):
                raise _invalid(f"destinations[{i}].operating_account is required", f"destinations[{i}].operating_account")
            if op.get("accountType") != GOOGLE_ADS:
                raise _invalid(f"destinations[{i}].operating_account.account_type must be GOOGLE_ADS",
                               f"destinations[{i}].operating_account.account_type")  # fmt: skip
            lid = str(d.get("productDestinationId") or "")
            if not lid:
                raise _invalid(f"destinations[{i}].product_destination_id is required",
                               f"destinations[{i}].product_destination_id")  # fmt: skip
            e = self.lists.get(lid)
            if e is None or e["list"]["account"] != op["accountId"]:
                raise ApiError("NOT_FOUND", f"destinations[{i}]: user list {lid} not found for the operating account")
            self._expire(lid)
            lids.append(lid)
        return lids

    def _rows(self, members: Any, encoding: int) -> list[bytes]:
        """Each member's key: its identifiers (`connector`'s Google payload keys) packed, in any order."""
        if not members:
            raise _invalid("audience_members is required and must not be empty", "audience_members")
        if len(members) > MAX_MEMBERS:
            raise _invalid(f"too many audience members: at most {MAX_MEMBERS} per request, got {len(members)}",
                           "audience_members")  # fmt: skip
        if encoding not in (HEX, BASE64):
            raise _invalid("encoding is required for hashed user data (HEX or BASE64)", "encoding")
        hashed = _hex if encoding == HEX else _base64_to_hex
        match = _HEX64.fullmatch if encoding == HEX else None  # HEX values are checked inline: the common case
        rows: list[bytes] = []
        for i, m in enumerate(members):
            ud = m.get("userData")
            if ud is None:
                kinds = sorted(k for k in m if k not in ("consent", "destinationReferences"))
                raise _invalid(f"audience_members[{i}]: only user_data (contact information) is emulated, got {kinds}",
                               f"audience_members[{i}]")  # fmt: skip
            idents = ud.get("userIdentifiers")
            if not idents:
                raise _invalid(f"audience_members[{i}].user_data.user_identifiers is required",
                               f"audience_members[{i}].user_data.user_identifiers")  # fmt: skip
            if len(idents) > MAX_IDENTIFIERS:
                raise _invalid(f"audience_members[{i}]: at most {MAX_IDENTIFIERS} user identifiers per member",
                               f"audience_members[{i}].user_data.user_identifiers")  # fmt: skip
            pieces: list[str] = []
            for j, ident in enumerate(idents):
                if "emailAddress" in ident:
                    v = ident["emailAddress"]
                    pieces.append(_EMAIL + (v if match and type(v) is str and match(v) else hashed(v, i, j, "email_address")))
                elif "phoneNumber" in ident:
                    v = ident["phoneNumber"]
                    pieces.append(_PHONE + (v if match and type(v) is str and match(v) else hashed(v, i, j, "phone_number")))
                elif "address" in ident:
                    a = ident["address"]
                    for key, ours, is_hashed in _ADDRESS_KEYS:
                        value = a.get(key)
                        if not value:
                            raise _invalid(f"{_where(i, j)}.address: given_name, family_name, region_code and "
                                           "postal_code are all required for an address match",
                                           f"{_where(i, j)}.address")  # fmt: skip
                        pieces.append(keys.google_piece(ours, hashed(value, i, j, "address") if is_hashed else value))
                else:
                    raise _invalid(f"{_where(i, j)}: one of email_address, phone_number or address is required",
                                   _where(i, j))  # fmt: skip
            rows.append(keys.google_key(pieces))
        return rows

    def _new_request(self, kind: str, lids: list[str], records: int, errors: dict[str, int], failed: bool) -> str:
        rid = uuid.uuid4().hex
        request = {"kind": kind, "lists": lids, "records": records, "errors": errors, "failed": failed,
                   "ready_at": self.clock.time() + self.processing_delay_seconds}  # fmt: skip
        self.requests[rid] = request
        self._record({"op": "req", "id": rid, "request": request})
        return rid

    def _ingest(self, r: dict[str, Any]) -> Any:
        lids = self._targets(r.get("destinations"))
        tos = (r.get("termsOfService") or {}).get("customerMatchTermsOfServiceStatus")
        if tos != ACCEPTED:
            raise _invalid("terms_of_service.customer_match_terms_of_service_status must be ACCEPTED when ingesting "
                           f"user data: the advertiser must accept the Customer Match terms of service ({TERMS_URL})",
                           "terms_of_service.customer_match_terms_of_service_status")  # fmt: skip
        members = r.get("audienceMembers") or []
        rows = self._rows(members, r.get("encoding") or 0)
        if r.get("validateOnly"):
            return {}
        failed = self.faults.fails_request()
        now = _us(self.clock.time())
        request_consent = r.get("consent") or {}
        request_aud = request_consent.get("adUserData", 0)
        request_ap = request_consent.get("adPersonalization", 0)
        denied = 0
        stored: list[bytes] = []
        stamps: list[int] = []
        for m, key in zip(members, rows, strict=True):
            # member-level consent overrides the request's, field by field
            consent = m.get("consent")
            if consent:
                aud = consent.get("adUserData", request_aud) or 0
                ap = consent.get("adPersonalization", request_ap) or 0
            else:
                aud, ap = request_aud or 0, request_ap or 0
            if aud == DENIED:
                denied += 1  # like the real API: accepted, not ingested, reported as DENIED_CONSENT
                continue
            stored.append(key)
            stamps.append(_stamp(now, aud, ap))
        if not failed:
            for lid in lids:
                e = self.lists[lid]
                e["members"].update(zip(stored, stamps, strict=True))
                if stored and now < e["oldest"]:
                    e["oldest"] = now
                self._record({"op": "put", "list": lid}, self._table(stored, stamps))
        errors = {"PROCESSING_ERROR_REASON_DENIED_CONSENT": denied} if denied else {}
        return {"requestId": self._new_request("ingest", lids, len(rows), errors, failed)}

    def _remove(self, r: dict[str, Any]) -> Any:
        lids = self._targets(r.get("destinations"))
        rows = self._rows(r.get("audienceMembers"), r.get("encoding") or 0)  # removals need no consent or terms
        if r.get("validateOnly"):
            return {}
        failed = self.faults.fails_request()
        if not failed:
            for lid in lids:
                members = self.lists[lid]["members"]
                gone = [row for row in rows if members.pop(row, None) is not None]
                if gone:
                    self._record({"op": "del", "list": lid}, self._table(gone))
        return {"requestId": self._new_request("remove", lids, len(rows), {}, failed)}

    def _remove_all(self, r: dict[str, Any]) -> Any:
        lids = self._targets(r.get("destinations"))
        if r.get("validateOnly"):
            return {}
        cutoff = self.clock.time()
        if r.get("removeAsOfTime"):
            cutoff = _timestamp(r["removeAsOfTime"])
        before = _us(cutoff) << 4  # stamps below this were ingested before the cutoff
        failed = self.faults.fails_request()
        if not failed:
            for lid in lids:
                members = self.lists[lid]["members"]
                gone = [row for row, v in members.items() if v < before]
                for row in gone:
                    del members[row]
                if gone:
                    self._record({"op": "del", "list": lid}, self._table(gone))
        return {"requestId": self._new_request("remove_all", lids, 0, {}, failed)}

    def _status(self, rid: str) -> Any:
        req = self.requests.get(rid)
        if req is None or req["ready_at"] <= self.clock.time() - REQUEST_STATUS_KEPT_SECONDS:
            raise ApiError("NOT_FOUND", "request id not found")
        processing = self.clock.time() < req["ready_at"]
        errors = dict(req["errors"])
        if req.get("failed"):
            state = "FAILED"
            errors = {"PROCESSING_ERROR_REASON_INTERNAL_ERROR": req["records"] or 1}
        else:
            state = "PARTIAL_SUCCESS" if errors else "SUCCESS"
        if processing:
            state = "PROCESSING"
        out = []
        for lid in req.get("lists") or [req.get("list")]:
            status: dict[str, Any] = {"destination": {"productDestinationId": lid}, "requestStatus": state}
            key = {"ingest": "audienceMembersIngestionStatus", "remove": "audienceMembersRemovalStatus"}.get(req["kind"])
            if key and not processing:
                inner = "userDataIngestionStatus" if req["kind"] == "ingest" else "userDataRemovalStatus"
                status[key] = {inner: {"recordCount": str(req["records"])}}
            if errors and not processing:
                status["errorInfo"] = {"errorCounts": [{"recordCount": str(n), "reason": reason}
                                                       for reason, n in errors.items()]}  # fmt: skip
            out.append(status)
        doc = {"requestStatusPerDestination": out}
        # validate against the client's own types before answering
        json_format.Parse(json.dumps(doc), dm.RetrieveRequestStatusResponse.pb(dm.RetrieveRequestStatusResponse()))
        return doc


def _where(i: int, j: int) -> str:
    return f"audience_members[{i}].user_data.user_identifiers[{j}]"


def _hex(value: Any, i: int, j: int, name: str) -> str:
    if type(value) is not str or not _HEX64.fullmatch(value):
        field = f"{_where(i, j)}.{name}"
        raise _invalid(f"{field}: hashed values must be SHA-256 as 64 lowercase hex characters (INVALID_SHA256_FORMAT)",
                       field)  # fmt: skip
    return value


def _base64_to_hex(value: Any, i: int, j: int, name: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        field = f"{_where(i, j)}.{name}"
        raise _invalid(f"{field}: hashed values must be SHA-256 in base64 (INVALID_SHA256_FORMAT)", field)
    return raw.hex()


def _timestamp(value: str) -> float:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    try:
        ts.FromJsonString(value)
    except ValueError:
        raise _invalid(
            f"Invalid value at 'remove_as_of_time' ({value!r}): expected an RFC 3339 time", "remove_as_of_time"
        ) from None
    return float(ts.seconds + ts.nanos / 1e9)


def start_datamanager_emulator(state_file: Path | None = None, **kwargs: Any) -> DataManagerEmulator:
    emu = DataManagerEmulator(state_file=state_file, **kwargs)
    emu.start()
    return emu
