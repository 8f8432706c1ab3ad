"""Emulator of the Graph API subset `connector` uses for Meta Custom Audiences (loopback HTTP).

Faithful to the real request and response shapes and limits: ``/v26.0`` prefix (optional),
trailing-slash reads, form or JSON bodies, access token in the body, the query string or an
``Authorization`` header. Strict like the platform, with its error body (``code``, ``error_subcode``,
``is_transient``, ``fbtrace_id``) and usage headers:
- ``/users`` and ``/usersreplace`` take only the documented parameters (``payload``, ``session``,
  ``method`` for removals, ``namespace`` on replace); ``payload`` only ``schema``, ``data``,
  ``is_raw``, ``app_ids``, ``page_ids``, ``ig_account_ids``, ``data_source``; the schema's keys must be
  known and unique, every row a list of the schema's length (error 100 naming the row); at most
  10,000 rows a request (error 100); ``session`` needs ``session_id``, ``batch_seq`` and
  ``last_batch_flag`` (``estimated_num_total`` optional), nothing else;
- one multi-key schema per audience (error 2650); hashed keys must be SHA-256 as 64 lowercase hex:
  other values are counted in ``num_invalid_entries`` and named in ``invalid_entry_samples``, a
  ``Map {string: string}`` (offending value -> reason) as the reference documents it, holding at
  most ``max_invalid_samples`` entries (so the count may exceed the samples); peers have seen
  lists, so ``invalid_samples_shape = "list"`` answers with a list of the offending values;
- value-based audiences (``is_value_based`` at creation, as the value-based lookalikes guide creates
  them): every row carries ``LOOKALIKE_VALUE``, "an integer or floating-point arbitrary non-negative
  number" (a string, a negative number, NaN or infinity is an invalid entry); other audiences refuse
  the key (error 100, unknown schema key); a member's value is an attribute of the member (adding it
  again with another value updates it), never part of who the member is; an audience never switches
  between value-based and not, a replace included (its rows must fit what the audience is); a lookalike
  is value-based exactly when its seed is, and asking for a value-based lookalike of a seed that is not
  is error 100;
- ``/usersreplace`` sessions (``operation_status`` 414 while running, 200 after, 415 when the
  90-minute window passed) with no ``/users`` call meanwhile; lookalikes (error 2654 for the same
  seed, country and ratio twice); ``tos_accepted``; ``DELETE /{audience_id}``.

Fault knobs (`FaultKnobs`): error rates per Graph code (``{"2": 0.2}``), throttling (error 80003
with ``estimated_time_to_regain_access``), latency, dropped connections before or after the change,
invalid values (``reject_rate``), audiences deleted between runs (``audience_deletion_rate``). Time
(the replace window) comes from an injectable clock.

Audiences hold their members in a dict: each member's identifiers packed into a `bytes` key
(`connector.sandbox.members`: a hash as its 32 raw bytes, tagged with its position in the schema), its
LOOKALIKE_VALUE (or None) as the value; so a 10,000-row call is 10,000 dict operations, and each call
that changes something appends one journal frame of its own rows to the state file. Form bodies are
decoded with `str.replace` for the few escapes a JSON payload needs (``%22``, ``%2C``, ...), and
`urllib.parse` for the rest.
"""

from __future__ import annotations

import json
import math
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import pyarrow as pa

from connector.clock import SYSTEM_CLOCK, Clock
from connector.sandbox import members as keys
from connector.sandbox.base import HttpEmulator
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.server import DropConnection, HttpRequest, HttpResponse

MAX_ROWS = 10_000
REPLACE_WINDOW_SECONDS = 90 * 60
HASHED_KEYS = frozenset({"EMAIL", "PHONE", "FN", "LN", "FI", "ZIP", "CT", "ST", "COUNTRY", "GEN", "DOBY",
                         "DOBM", "DOBD"})  # fmt: skip
VALID_KEYS = HASHED_KEYS | {"MADID", "EXTERN_ID"}
# single-key schema names of the reference ("EMAIL_SHA256", ...) and the multi-key key they stand for
SINGLE_KEY_ALIASES = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE", "MOBILE_ADVERTISER_ID": "MADID"}
VALUE_KEY = "LOOKALIKE_VALUE"  # value-based audiences only; a number, not hashed
USERS_PARAMS = frozenset({"payload", "session", "method", "appsecret_proof"})
REPLACE_PARAMS = frozenset({"payload", "session", "namespace", "appsecret_proof"})
PAYLOAD_KEYS = frozenset({"schema", "data", "is_raw", "app_ids", "page_ids", "ig_account_ids", "data_source"})
SESSION_KEYS = frozenset({"session_id", "batch_seq", "last_batch_flag", "estimated_num_total"})
CREATE_PARAMS = frozenset({"name", "subtype", "description", "customer_file_source", "origin_audience_id",
                           "lookalike_spec", "is_value_based", "retention_days", "audience_labels",
                           "appsecret_proof"})  # fmt: skip
_HEX64 = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
_VERSION = re.compile(r"^/v\d+\.\d+")
TRANSIENT_CODES = frozenset({"1", "2"})
THROTTLE_CODES = frozenset({"4", "17", "32", "613", "80003", "80004"})
SIZE_TOO_LOW_SUBCODE = 1870145
# the escapes of the characters a JSON payload is made of, decoded with str.replace before the rest
_FORM_ESCAPES = tuple((f"%{ord(c):02X}", c) for c in '",:[]{}')
_MISSING = object()


class GraphError(Exception):
    def __init__(self, code: int, message: str, *, subcode: int | None = None, transient: bool = False,
                 status: int = 400, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.code, self.subcode, self.transient, self.status = code, subcode, transient, status
        self.headers = headers or {}

    def response(self) -> HttpResponse:
        err: dict[str, Any] = {
            "message": str(self),
            "type": "OAuthException",
            "code": self.code,
            "is_transient": self.transient,
            "fbtrace_id": uuid.uuid4().hex[:11],
        }
        if self.subcode is not None:
            err["error_subcode"] = self.subcode
        return HttpResponse(self.status, {"error": err}, headers=self.headers)


class MetaGraphEmulator(HttpEmulator):
    """`start()` serves on 127.0.0.1 (a free port unless given) and returns the base URL."""

    MEMBERS = pa.schema([("key", pa.binary()), ("value", pa.float64())])

    def __init__(self, *, state_file: Path | None = None, expected_token: str | None = "sandbox-token",  # noqa: S107
                 faults: FaultKnobs | None = None, tos_accepted: bool = True, port: int = 0,
                 size_too_low_threshold: int = 0, min_lookalike_seed: int = 100, clock: Clock | None = None,
                 max_invalid_samples: int = 100, invalid_samples_shape: Literal["map", "list"] = "map") -> None:  # fmt: skip
        self.state_file = state_file
        self.expected_token = expected_token
        self.faults = faults or FaultKnobs()
        self.tos_accepted = tos_accepted
        self.size_too_low_threshold = size_too_low_threshold
        self.min_lookalike_seed = min_lookalike_seed
        self.clock = clock or SYSTEM_CLOCK
        self.max_invalid_samples = max_invalid_samples
        self.invalid_samples_shape = invalid_samples_shape
        self.audiences: dict[str, dict[str, Any]] = {}
        self.request_log: list[dict[str, Any]] = []
        self.write_calls = 0
        self._next_id = 10**14
        self._lock = threading.RLock()
        self._serve(port)
        self._load_state()
        if self.audiences and self.faults.audience_deletion_rate > 0:
            self.between_runs()

    # ------------------------------------------------------------------ state

    @staticmethod
    def _meta(a: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in a.items() if k not in ("members", "replace")}

    def _table(self, members: list[bytes], values: list[Any] | None = None) -> pa.Table:
        column = pa.array(values, pa.float64()) if values is not None else pa.nulls(len(members), pa.float64())
        return pa.table([pa.array(members, pa.binary()), column], schema=self.MEMBERS)

    def _state(self) -> tuple[dict[str, Any], dict[str, pa.Table]]:
        state = {"next_id": self._next_id, "audiences": {aid: self._meta(a) for aid, a in self.audiences.items()}}
        return state, {aid: self._table(list(a["members"]), list(a["members"].values()))
                       for aid, a in self.audiences.items()}  # fmt: skip

    def _restore(self, state: dict[str, Any], members: dict[str, pa.Table]) -> None:
        self._next_id = int(state.get("next_id", self._next_id))
        for aid, a in state.get("audiences", {}).items():
            rows = members[aid]
            a["members"] = dict(zip(rows.column("key").to_pylist(), rows.column("value").to_pylist(), strict=True))
            a["replace"] = None
            self.audiences[aid] = a
            self._next_id = max(self._next_id, int(aid))

    def _replay(self, entry: dict[str, Any], rows: pa.Table | None) -> None:
        op, aid = entry["op"], entry["id"]
        if op == "audience":
            a = self.audiences.setdefault(aid, {"members": {}, "replace": None})
            a.update(entry["audience"])
            self._next_id = max(self._next_id, int(aid))
        elif op == "drop":
            self.audiences.pop(aid, None)
        elif aid in self.audiences:
            members = self.audiences[aid]["members"]
            if op == "clear":
                members.clear()
            elif op == "add" and rows is not None:
                members.update(zip(rows.column("key").to_pylist(), rows.column("value").to_pylist(), strict=True))
            elif op == "del" and rows is not None:
                for key in rows.column("key").to_pylist():
                    members.pop(key, None)

    def _record_audience(self, a: dict[str, Any]) -> None:
        self._record({"op": "audience", "id": a["id"], "audience": self._meta(a)})

    def _audiences(self) -> dict[str, Any]:
        return self.audiences

    @staticmethod
    def _pairs(schema: list[str], key: bytes) -> frozenset[tuple[str, str]]:
        return frozenset((schema[slot], value) for slot, value in keys.unpack(key))

    def members(self, audience_id: str) -> set[tuple[str, ...]]:
        """Each member as its row of the audience's schema (identifiers only, "" where it has none)."""
        with self._lock:
            a = self.audiences[audience_id]
            width = len(_identifiers(a.get("schema") or []))
            out = set()
            for key in a["members"]:
                row = [""] * width
                for slot, value in keys.unpack(key):
                    row[slot] = value
                out.add(tuple(row))
            return out

    def member_count(self, audience_id: str) -> int | None:
        with self._lock:
            a = self.audiences.get(audience_id)
            return None if a is None else len(a["members"])

    def member_dicts(self, audience_id: str) -> set[frozenset[tuple[str, str]]]:
        """Rows as (key, value) pairs without empty values: comparable across schemas."""
        with self._lock:
            a = self.audiences[audience_id]
            schema = _identifiers(a.get("schema") or [])
            return {self._pairs(schema, key) for key in a["members"]}

    def values(self, audience_id: str) -> dict[frozenset[tuple[str, str]], float]:
        """Each member's LOOKALIKE_VALUE (value-based audiences), by its (key, value) pairs as in `member_dicts`."""
        with self._lock:
            a = self.audiences[audience_id]
            schema = _identifiers(a.get("schema") or [])
            return {self._pairs(schema, key): value for key, value in a["members"].items() if value is not None}

    # ------------------------------------------------------------------ request handling

    def handle(self, req: HttpRequest) -> HttpResponse:
        params = self._params(req)
        token_in_url = "access_token" in req.query
        token = params.pop("access_token", None)
        auth = req.headers.get("authorization", "")
        if not token and auth.lower().startswith(("bearer ", "oauth ")):
            token = auth.split(" ", 1)[1].strip()
        path = _VERSION.sub("", req.path).rstrip("/") or "/"
        write = req.method in ("POST", "DELETE")
        self.request_log.append({
            "method": req.method, "path": req.path, "query_keys": sorted(req.query), "token_in_url": token_in_url,
            "body": self._log_body(req.body), "headers": dict(req.headers),
        })  # fmt: skip
        self.faults.delay()
        headers = self._usage_headers(0)
        try:
            if self.expected_token is not None and token != self.expected_token:
                raise GraphError(190, "Error validating access token: the session is invalid.", subcode=460,
                                 status=400)  # fmt: skip
            if self.faults.drop(write) and not self.faults.drop_after_apply:
                raise DropConnection()
            self._inject(write)
            with self._lock:
                try:
                    body = self._route(req.method, path, params)
                finally:
                    self._flush()
                if write:
                    self.write_calls += 1
            if write and self.faults.drop_after_apply and self.faults.drop(write):
                raise DropConnection()
            return HttpResponse(200, body, headers=headers)
        except GraphError as exc:
            exc.headers = {**headers, **exc.headers}
            return exc.response()

    def _inject(self, write: bool) -> None:
        if self.faults.throttle(write):
            wait = self.faults.throttle_retry_after
            raise GraphError(
                80003, "There have been too many calls to this ad-account. Wait a bit and try again.",
                subcode=2446079, headers=self._usage_headers(100, wait / 60),
            )  # fmt: skip
        code = self.faults.pick_error(write)
        if code is None:
            return
        if code in TRANSIENT_CODES:
            raise GraphError(int(code), "An unexpected error has occurred. Please retry your request later.",
                             transient=True, status=500)  # fmt: skip
        if code == "500":
            raise GraphError(1, "Service temporarily unavailable", transient=True, status=503)
        if code in THROTTLE_CODES:
            raise GraphError(int(code), "User request limit reached", headers=self._usage_headers(100, 0))
        raise GraphError(int(code), f"Injected error {code}")

    @staticmethod
    def _usage_headers(pct: int, regain_minutes: float = 0) -> dict[str, str]:
        usage = {"1": [{"type": "custom_audience", "call_count": pct, "total_cputime": pct // 2,
                        "total_time": pct // 2, "estimated_time_to_regain_access": regain_minutes}]}  # fmt: skip
        return {
            "X-Business-Use-Case-Usage": json.dumps(usage),
            "X-Ad-Account-Usage": json.dumps({"acc_id_util_pct": pct, "reset_time_duration": 0}),
        }

    @staticmethod
    def _params(req: HttpRequest) -> dict[str, Any]:
        params: dict[str, Any] = {k: v[-1] for k, v in req.query.items()}
        ctype = req.headers.get("content-type", "")
        if req.body:
            if "json" in ctype:
                try:
                    params.update(json.loads(req.body))
                except ValueError:
                    raise GraphError(100, "Invalid JSON body") from None
            else:
                params.update(_form(req.body.decode("utf-8")))
        return params

    def _route(self, method: str, path: str, p: dict[str, Any]) -> Any:
        parts = path.strip("/").split("/")
        if parts[0].startswith("act_"):
            account = parts[0][4:]
            if len(parts) == 1 and method == "GET":
                return {"id": parts[0], "account_id": account,
                        "tos_accepted": {"custom_audience_tos": 1} if self.tos_accepted else {}}  # fmt: skip
            if len(parts) == 2 and parts[1] == "customaudiences":
                if method == "POST":
                    return self._create(account, p)
                return self._list(account, p)
        elif len(parts) == 1 and method == "GET":
            return self._read(self._audience(parts[0]), p)
        elif len(parts) == 1 and method == "DELETE":
            self._audience(parts[0])
            self.delete_audience(parts[0])
            return {"success": True}
        elif len(parts) == 2 and method == "POST" and parts[1] == "users":
            delete = str(p.get("method", "")).upper() == "DELETE"
            return self._users(self._audience(parts[0]), p, delete)
        elif len(parts) == 2 and method == "DELETE" and parts[1] == "users":
            return self._users(self._audience(parts[0]), p, True)
        elif len(parts) == 2 and method == "POST" and parts[1] == "usersreplace":
            return self._replace(self._audience(parts[0]), p)
        raise GraphError(100, f"Unsupported {method} request to {path}")

    def _audience(self, aid: str) -> dict[str, Any]:
        a = self.audiences.get(aid)
        if a is None:
            raise GraphError(100, f"Unsupported get request. Object with ID '{aid}' does not exist",
                             subcode=33)  # fmt: skip
        return a

    @staticmethod
    def _json_param(p: dict[str, Any], name: str) -> Any:
        v = p.get(name)
        if isinstance(v, str):
            try:
                return json.loads(v)
            except ValueError:
                raise GraphError(100, f"Invalid parameter: {name} must be JSON") from None
        return v

    def _create(self, account: str, p: dict[str, Any]) -> dict[str, Any]:
        _only(p, CREATE_PARAMS, "creating a custom audience")
        subtype = str(p.get("subtype", "CUSTOM")).upper()
        name = p.get("name")
        if not name:
            raise GraphError(100, "Invalid parameter: name is required")
        self._next_id += 1
        aid = str(self._next_id)
        value_based = str(p.get("is_value_based", "")).lower() in ("1", "true")
        base = {"id": aid, "account_id": account, "name": name, "subtype": subtype, "members": {}, "schema": None,
                "replace": None, "operation_status": 200, "created": self.clock.time(),
                "description": p.get("description", ""), "is_value_based": value_based}  # fmt: skip
        if subtype == "CUSTOM":
            if not self.tos_accepted:
                raise GraphError(200, "Permissions error: Custom Audience terms not accepted", subcode=1870090,
                                 status=403)  # fmt: skip
            if p.get("customer_file_source") not in ("USER_PROVIDED_ONLY", "PARTNER_PROVIDED_ONLY",
                                                     "BOTH_USER_AND_PARTNER_PROVIDED"):  # fmt: skip
                raise GraphError(100, "Invalid parameter: customer_file_source is required for customer file audiences")
            base["customer_file_source"] = p["customer_file_source"]
        elif subtype == "LOOKALIKE":
            origin = str(p.get("origin_audience_id", ""))
            seed = self._audience(origin)
            if value_based and not seed.get("is_value_based"):
                raise GraphError(100, "Invalid parameter: a value-based lookalike needs a value-based seed audience "
                                      "(created with is_value_based)")  # fmt: skip
            # a lookalike of a value-based seed is value-based (value-based lookalikes guide, step 3)
            base["is_value_based"] = bool(seed.get("is_value_based"))
            spec = self._json_param(p, "lookalike_spec") or {}
            ratio = float(spec.get("ratio", 0))
            country = spec.get("country") or json.dumps(spec.get("location_spec"), sort_keys=True)
            if not (0.01 <= ratio <= 0.20) or not country:
                raise GraphError(100, "Invalid parameter: lookalike_spec needs ratio 0.01-0.20 and a country")
            if len(seed["members"]) < self.min_lookalike_seed:
                raise GraphError(100, "The source audience is too small: at least 100 people are needed",
                                 subcode=1713007)  # fmt: skip
            for other in self.audiences.values():
                ls = other.get("lookalike_spec") or {}
                if (
                    other.get("origin_audience_id") == origin
                    and abs(float(ls.get("ratio", 0)) - ratio) < 1e-9
                    and (ls.get("country") or json.dumps(ls.get("location_spec"), sort_keys=True)) == country
                ):
                    raise GraphError(2654, "A lookalike audience with the same source, country and ratio exists")
            base.update(origin_audience_id=origin, lookalike_spec=spec)
        else:
            raise GraphError(100, f"Invalid parameter: subtype {subtype}")
        self.audiences[aid] = base
        self._record_audience(base)
        return {"id": aid}

    def _summary(self, a: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        n = len(a["members"]) if a["subtype"] == "CUSTOM" else (len(self.audiences[a["origin_audience_id"]]["members"])
                                                             * 100 if a.get("origin_audience_id") in self.audiences
                                                             else 0)  # fmt: skip
        op = a.get("operation_status", 200)
        if a.get("replace") and self.clock.time() - a["replace"]["started"] > REPLACE_WINDOW_SECONDS:
            a["replace"], op = None, 415
            a["operation_status"] = 415
        full = {
            "id": a["id"], "name": a["name"], "subtype": a["subtype"], "account_id": a["account_id"],
            "description": a.get("description", ""),
            # the real API rounds and hides small sizes; the emulator reports the exact count as both bounds
            "approximate_count_lower_bound": n, "approximate_count_upper_bound": n,
            "operation_status": {"code": op, "description": {200: "Normal", 414: "Replace in progress",
                                                             415: "Replace failed"}.get(op, "")},
            "delivery_status": {"code": 200 if n >= 100 else 300,
                                "description": "ready for use" if n >= 100 else "audience is too small"},
            "customer_file_source": a.get("customer_file_source"),
            "origin_audience_id": a.get("origin_audience_id"),
            "lookalike_spec": a.get("lookalike_spec"),
            "is_value_based": bool(a.get("is_value_based")),
        }  # fmt: skip
        unknown = [f for f in fields if f not in full]
        if unknown:
            raise GraphError(100, f"Tried accessing nonexisting field ({unknown[0]}) on node type (CustomAudience)")
        if not fields:
            return {"id": a["id"]}
        return {k: v for k, v in full.items() if k in fields or k == "id"}

    def _read(self, a: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
        fields = [f for f in str(p.get("fields", "")).split(",") if f]
        return self._summary(a, fields)

    def _list(self, account: str, p: dict[str, Any]) -> dict[str, Any]:
        fields = [f for f in str(p.get("fields", "")).split(",") if f] or ["id", "name"]
        items = [self._summary(a, fields) for a in self.audiences.values() if a["account_id"] == account]
        return {"data": items, "paging": {}}

    def _session(self, p: dict[str, Any], required: bool) -> dict[str, Any]:
        session = self._json_param(p, "session")
        if session is None:
            if required:
                raise GraphError(100, "Invalid parameter: session is required (session_id, batch_seq, last_batch_flag)")
            return {}
        if not isinstance(session, dict):
            raise GraphError(100, "Invalid parameter: session must be a JSON object")
        _only(session, SESSION_KEYS, "session")
        for key in ("session_id", "batch_seq", "last_batch_flag"):
            if key not in session:
                raise GraphError(100, f"Invalid parameter: session.{key} is required")
        for key in ("session_id", "batch_seq", "estimated_num_total"):
            v = session.get(key)
            if v is not None and not (type(v) is int or (isinstance(v, str) and v.isdigit())):
                raise GraphError(100, f"Invalid parameter: session.{key} must be an integer, got {v!r}")
        if int(session["batch_seq"]) < 1:
            raise GraphError(100, "Invalid parameter: session.batch_seq starts at 1")
        if not isinstance(session["last_batch_flag"], bool):
            raise GraphError(100, "Invalid parameter: session.last_batch_flag must be true or false")
        return session

    def _rows(self, a: dict[str, Any], p: dict[str, Any]) -> tuple[list[str], list[bytes], list[Any], int, Any]:
        """(schema, each valid row's member key, each one's LOOKALIKE_VALUE or None, number of invalid rows,
        invalid_entry_samples) of one upload."""
        payload = self._json_param(p, "payload")
        if not isinstance(payload, dict) or "schema" not in payload or "data" not in payload:
            raise GraphError(100, "Invalid parameter: payload must have schema and data")
        _only(payload, PAYLOAD_KEYS, "payload")
        raw_schema = payload["schema"]
        single = isinstance(raw_schema, str)
        schema = [SINGLE_KEY_ALIASES.get(raw_schema, raw_schema)] if single else raw_schema
        if not isinstance(schema, list) or not schema or not all(isinstance(k, str) for k in schema):
            raise GraphError(100, "Invalid parameter: payload.schema must be a key or a list of keys")
        valid_keys = VALID_KEYS | ({VALUE_KEY} if a.get("is_value_based") else set())
        unknown = [k for k in schema if k not in valid_keys]
        if unknown:
            raise GraphError(100, f"Invalid parameter: unknown schema key(s) {unknown}")
        if len(set(schema)) != len(schema):
            raise GraphError(100, "Invalid parameter: a schema key appears twice")
        if a.get("is_value_based") and VALUE_KEY not in schema:
            raise GraphError(100, f"Invalid parameter: a value-based audience needs {VALUE_KEY} in the schema")
        data = payload["data"]
        if not isinstance(data, list) or not data:
            raise GraphError(100, "Invalid parameter: payload.data must be a non-empty list of rows")
        if len(data) > MAX_ROWS:
            raise GraphError(100, f"Invalid parameter: a request may contain at most {MAX_ROWS} users",
                             subcode=1870065)  # fmt: skip
        if a["schema"] is not None and a["schema"] != schema:
            raise GraphError(2650, "The schema of the uploaded data does not match the schema of this audience")
        width = len(schema)
        hashed = [k in HASHED_KEYS for k in schema]
        value_at = schema.index(VALUE_KEY) if VALUE_KEY in schema else -1
        # an identifier's tag is its position among the schema's identifiers (LOOKALIKE_VALUE is not one)
        tags = [j - (0 <= value_at < j) for j in range(width)]
        prefixes = [f"{t:02x}" for t in tags]
        rejects = self.faults.reject_rate > 0
        good: list[bytes] = []
        worth: list[Any] = []
        invalid = 0
        bad_values: dict[str, str] = {}
        hex64 = _HEX64.fullmatch
        for i, row in enumerate(data):
            if single and isinstance(row, str):
                row = [row]
            if type(row) is not list or len(row) != width:
                raise GraphError(100, f"Invalid parameter: payload.data[{i}] must be a list of {width} value(s), one "
                                      "per schema key")  # fmt: skip
            bad = bad_key = value = None
            pieces = []
            for j, v in enumerate(row):
                if j == value_at:
                    # "an integer or floating-point arbitrary non-negative number" (value-based lookalikes guide)
                    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                        bad, bad_key = str(v), VALUE_KEY
                        break
                    value = v
                    continue
                if type(v) is not str:
                    raise GraphError(100, f"Invalid parameter: payload.data[{i}][{j}] must be a string")
                if not v:
                    continue
                if not hashed[j]:
                    pieces.append(keys.text(tags[j], v))
                elif not hex64(v) or (rejects and self.faults.rejects(v)):
                    bad, bad_key = v, schema[j]
                    break
                else:
                    pieces.append(prefixes[j] + v)
            if bad is not None:
                invalid += 1
                if len(bad_values) < self.max_invalid_samples:
                    bad_values[bad] = (
                        f"Invalid {bad_key} value: expected a SHA-256 hash (64 lowercase hex)"
                        if bad_key != VALUE_KEY
                        else f"Invalid {VALUE_KEY}: expected a non-negative number"
                    )
                continue
            if not pieces:
                invalid += 1  # a row without any identifier matches nobody
                continue
            good.append(bytes.fromhex("".join(pieces)))
            worth.append(value)
        samples: Any = list(bad_values) if self.invalid_samples_shape == "list" else bad_values
        return schema, good, worth, invalid, samples

    def _users(self, a: dict[str, Any], p: dict[str, Any], delete: bool) -> dict[str, Any]:
        if a["subtype"] != "CUSTOM":
            raise GraphError(100, "Users can only be added to customer file custom audiences")
        _only(p, USERS_PARAMS, "/users")
        if a.get("replace"):
            raise GraphError(2655, "The audience is being replaced; /users calls are not allowed until it finishes")
        session = self._session(p, required=True)
        schema, good, worth, invalid, samples = self._rows(a, p)
        members = a["members"]
        if delete:
            # a removal matches the member's identifiers, whatever value it carries
            gone = [key for key in good if key in members]
            if self.size_too_low_threshold and len(members) - len(gone) < self.size_too_low_threshold:
                raise GraphError(100, "Audience Size too low: removing these users would make the audience too small",
                                 subcode=SIZE_TOO_LOW_SUBCODE)  # fmt: skip
            for key in gone:
                members.pop(key, None)
            if gone:
                self._record({"op": "del", "id": a["id"]}, self._table(gone))
        else:
            if a["schema"] is None:
                a["schema"] = schema
                self._record_audience(a)
            # new members, and members whose value changed (the value is updated, the member stays one)
            get = members.get
            new = [i for i, key in enumerate(good) if get(key, _MISSING) != worth[i]]
            if new:
                added, values = [good[i] for i in new], [worth[i] for i in new]
                members.update(zip(added, values, strict=True))
                self._record({"op": "add", "id": a["id"]}, self._table(added, values))
        return {
            "audience_id": a["id"], "session_id": str(session.get("session_id")), "num_received": len(good) + invalid,
            "num_invalid_entries": invalid, "invalid_entry_samples": samples,
        }  # fmt: skip

    def _replace(self, a: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
        if a["subtype"] != "CUSTOM":
            raise GraphError(100, "Users can only be replaced in customer file custom audiences")
        _only(p, REPLACE_PARAMS, "/usersreplace")
        session = self._session(p, required=True)
        sid, seq = session.get("session_id"), int(session.get("batch_seq", 0))
        last = bool(session.get("last_batch_flag"))
        rep = a.get("replace")
        now = self.clock.time()
        if seq == 1 and rep is None:
            rep = a["replace"] = {"session_id": sid, "started": now, "seq": 0, "rows": {}}
            a["operation_status"] = 414
        if rep is None or rep["session_id"] != sid:
            raise GraphError(100, "Invalid replace session: start with batch_seq 1 and one session at a time")
        if seq != rep["seq"] + 1 and seq != rep["seq"]:
            raise GraphError(100, f"Invalid batch_seq {seq}: expected {rep['seq'] + 1}")
        if now - rep["started"] > REPLACE_WINDOW_SECONDS:
            a["replace"], a["operation_status"] = None, 415
            self._record_audience(a)
            raise GraphError(100, "The replace session expired (90 minutes)")
        saved_schema = a["schema"]
        a["schema"] = None  # a replace may set a new schema
        try:
            schema, good, worth, invalid, samples = self._rows(a, p)
        finally:
            a["schema"] = saved_schema
        rep["schema"] = schema
        rep["rows"].update(zip(good, worth, strict=True))
        rep["seq"] = seq
        if last:
            a["members"], a["schema"] = dict(rep["rows"]), schema
            a["replace"], a["operation_status"] = None, 200
            self._record_audience(a)
            self._record({"op": "clear", "id": a["id"]})
            self._record({"op": "add", "id": a["id"]}, self._table(list(rep["rows"]), list(rep["rows"].values())))
        return {
            "audience_id": a["id"], "session_id": str(sid), "num_received": len(good) + invalid,
            "num_invalid_entries": invalid, "invalid_entry_samples": samples,
        }  # fmt: skip


def _identifiers(schema: list[str]) -> list[str]:
    return [k for k in schema if k != VALUE_KEY]


def _unquote_plus(value: str) -> str:
    """`urllib.parse.unquote_plus`, with the escapes of a JSON payload's characters replaced by `str.replace`
    first (never ``%25``, and none of them yields a hex digit: no new escape appears, so `unquote` finishes
    with the same result)."""
    value = value.replace("+", " ")
    if "%" not in value:
        return value
    for escape, char in _FORM_ESCAPES:
        value = value.replace(escape, char)
    return unquote(value) if "%" in value else value


def _form(body: str) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body, as `parse_qs(keep_blank_values=True)` reads it (the last
    value of a repeated name)."""
    out: dict[str, str] = {}
    for field in body.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        out[_unquote_plus(name)] = _unquote_plus(value)
    return out


def _only(params: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in params if k not in allowed)
    if unknown:
        raise GraphError(100, f"Invalid parameter: {unknown[0]!r} is not a parameter of {where}")


def start_meta_emulator(state_file: Path | None = None, **kwargs: Any) -> MetaGraphEmulator:
    emu = MetaGraphEmulator(state_file=state_file, **kwargs)
    emu.start()
    return emu
