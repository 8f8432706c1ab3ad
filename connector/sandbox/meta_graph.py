"""Emulator of the Graph API subset `connector` uses for Meta Custom Audiences (loopback HTTP).

Faithful to the real request and response shapes and limits: ``/v26.0`` prefix (optional),
trailing-slash reads, form or JSON bodies, access token in the body, the query string or an
``Authorization`` header; at most 10,000 rows a ``/users`` call (error 100), one multi-key schema
per audience (error 2650), 64-hex hashes for hashed keys (counted in ``num_invalid_entries``
with ``invalid_entry_samples``), ``/usersreplace`` sessions (``operation_status`` 414 while
running, 200 after, 415 when the 90-minute window passed) with no ``/users`` call meanwhile,
lookalikes (error 2654 for the same seed, country and ratio twice), ``tos_accepted``, error bodies
with ``code``/``error_subcode``/``is_transient``/``fbtrace_id`` and usage headers.

Fault knobs (`FaultKnobs`): error rates per Graph code (``{"2": 0.2}``), throttling (error 80003
with ``estimated_time_to_regain_access``), latency, dropped connections before or after the change.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from connector.sandbox.base import HttpEmulator
from connector.sandbox.faults import FaultKnobs
from connector.sandbox.server import DropConnection, HttpRequest, HttpResponse

MAX_ROWS = 10_000
REPLACE_WINDOW_SECONDS = 90 * 60
HASHED_KEYS = frozenset({"EMAIL", "PHONE", "FN", "LN", "FI", "ZIP", "CT", "ST", "COUNTRY", "GEN", "DOBY",
                         "DOBM", "DOBD"})  # fmt: skip
VALID_KEYS = HASHED_KEYS | {"MADID", "EXTERN_ID"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^/v\d+\.\d+")
TRANSIENT_CODES = frozenset({"1", "2"})
THROTTLE_CODES = frozenset({"4", "17", "32", "613", "80003", "80004"})
SIZE_TOO_LOW_SUBCODE = 1870145


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

    def __init__(self, *, state_file: Path | None = None, expected_token: str | None = "sandbox-token",  # noqa: S107
                 faults: FaultKnobs | None = None, tos_accepted: bool = True, port: int = 0,
                 size_too_low_threshold: int = 0, min_lookalike_seed: int = 100) -> None:  # fmt: skip
        self.state_file = state_file
        self.expected_token = expected_token
        self.faults = faults or FaultKnobs()
        self.tos_accepted = tos_accepted
        self.size_too_low_threshold = size_too_low_threshold
        self.min_lookalike_seed = min_lookalike_seed
        self.audiences: dict[str, dict[str, Any]] = {}
        self.request_log: list[dict[str, Any]] = []
        self.write_calls = 0
        self._lock = threading.RLock()
        self._serve(port)
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        data = self._read_state() or {}
        for aid, a in data.get("audiences", {}).items():
            a["rows"] = {tuple(r) for r in a.get("rows", [])}
            a["replace"] = None
            self.audiences[aid] = a

    def _state(self) -> dict[str, Any]:
        return {
            "audiences": {
                aid: {**{k: v for k, v in a.items() if k not in ("rows", "replace")}, "rows": sorted(a["rows"])}
                for aid, a in self.audiences.items()
            }
        }

    # ------------------------------------------------------------------ inspection

    def members(self, audience_id: str) -> set[tuple[str, ...]]:
        with self._lock:
            return set(self.audiences[audience_id]["rows"])

    def member_dicts(self, audience_id: str) -> set[frozenset[tuple[str, str]]]:
        """Rows as (key, value) pairs without empty values: comparable across schemas."""
        with self._lock:
            a = self.audiences[audience_id]
            schema = a.get("schema") or []
            return {frozenset((k, v) for k, v in zip(schema, row, strict=True) if v) for row in a["rows"]}

    # ------------------------------------------------------------------ request handling

    def handle(self, req: HttpRequest) -> HttpResponse:
        params = self._params(req)
        token_in_url = "access_token" in req.query
        token = params.pop("access_token", None)
        auth = req.headers.get("authorization", "")
        if not token and auth.lower().startswith(("bearer ", "oauth ")):
            token = auth.split(" ", 1)[1].strip()
        path = _VERSION.sub("", req.path).rstrip("/") or "/"
        write = req.method == "POST"
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
                body = self._route(req.method, path, params)
                if write:
                    self.write_calls += 1
                    self._save()
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
                form = parse_qs(req.body.decode("utf-8"), keep_blank_values=True)
                params.update({k: v[-1] for k, v in form.items()})
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
        subtype = str(p.get("subtype", "CUSTOM")).upper()
        name = p.get("name")
        if not name:
            raise GraphError(100, "Invalid parameter: name is required")
        aid = str(10**14 + len(self.audiences) + 1 + int(time.time()) % 10**6 * 1000)
        base = {"id": aid, "account_id": account, "name": name, "subtype": subtype, "rows": set(), "schema": None,
                "replace": None, "operation_status": 200, "created": time.time(),
                "description": p.get("description", "")}  # fmt: skip
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
            spec = self._json_param(p, "lookalike_spec") or {}
            ratio = float(spec.get("ratio", 0))
            country = spec.get("country") or json.dumps(spec.get("location_spec"), sort_keys=True)
            if not (0.01 <= ratio <= 0.20) or not country:
                raise GraphError(100, "Invalid parameter: lookalike_spec needs ratio 0.01-0.20 and a country")
            if len(seed["rows"]) < self.min_lookalike_seed:
                raise GraphError(100, "The source audience is too small: at least 100 people are needed",
                                 subcode=1713007)  # fmt: skip
            for other in self.audiences.values():
                ls = other.get("lookalike_spec") or {}
                if (other.get("origin_audience_id") == origin and abs(float(ls.get("ratio", 0)) - ratio) < 1e-9
                        and (ls.get("country") or json.dumps(ls.get("location_spec"), sort_keys=True)) == country):
                    raise GraphError(2654, "A lookalike audience with the same source, country and ratio exists")
            base.update(origin_audience_id=origin, lookalike_spec=spec)
            base["rows"] = set()
        else:
            raise GraphError(100, f"Invalid parameter: subtype {subtype}")
        self.audiences[aid] = base
        return {"id": aid}

    def _summary(self, a: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        n = len(a["rows"]) if a["subtype"] == "CUSTOM" else (len(self.audiences[a["origin_audience_id"]]["rows"])
                                                             * 100 if a.get("origin_audience_id") in self.audiences
                                                             else 0)  # fmt: skip
        op = a.get("operation_status", 200)
        if a.get("replace") and time.time() - a["replace"]["started"] > REPLACE_WINDOW_SECONDS:
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
        }  # fmt: skip
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

    def _rows(self, a: dict[str, Any], p: dict[str, Any]) -> tuple[list[str], list[list[str]], int, dict[str, str]]:
        payload = self._json_param(p, "payload")
        if not isinstance(payload, dict) or "schema" not in payload or "data" not in payload:
            raise GraphError(100, "Invalid parameter: payload must have schema and data")
        schema = payload["schema"]
        schema = [schema] if isinstance(schema, str) else list(schema)
        unknown = [k for k in schema if k not in VALID_KEYS]
        if unknown:
            raise GraphError(100, f"Invalid parameter: unknown schema key(s) {unknown}")
        data = payload["data"]
        if len(data) > MAX_ROWS:
            raise GraphError(100, f"Invalid parameter: a request may contain at most {MAX_ROWS} users",
                             subcode=1870065)  # fmt: skip
        if a["schema"] is not None and a["schema"] != schema:
            raise GraphError(2650, "The schema of the uploaded data does not match the schema of this audience")
        good: list[list[str]] = []
        invalid = 0
        samples: dict[str, str] = {}
        for row in data:
            row = [row] if isinstance(row, str) else list(row)
            if len(row) != len(schema):
                invalid += 1
                continue
            bad = next((v for k, v in zip(schema, row, strict=True) if k in HASHED_KEYS and v
                        and (not _HEX64.match(v) or self.faults.rejects(v))), None)  # fmt: skip
            if bad is not None or not any(row):
                invalid += 1
                if len(samples) < 100:
                    samples[bad or ""] = "Invalid hashed value" if bad else "Empty row"
                continue
            good.append(row)
        return schema, good, invalid, samples

    def _users(self, a: dict[str, Any], p: dict[str, Any], delete: bool) -> dict[str, Any]:
        if a["subtype"] != "CUSTOM":
            raise GraphError(100, "Users can only be added to customer file custom audiences")
        if a.get("replace"):
            raise GraphError(2655, "The audience is being replaced; /users calls are not allowed until it finishes")
        schema, good, invalid, samples = self._rows(a, p)
        session = self._json_param(p, "session") or {}
        if delete:
            rows_after = a["rows"] - {tuple(r) for r in good}
            if self.size_too_low_threshold and len(rows_after) < self.size_too_low_threshold:
                raise GraphError(100, "Audience Size too low: removing these users would make the audience too small",
                                 subcode=SIZE_TOO_LOW_SUBCODE)  # fmt: skip
            a["rows"] = rows_after
        else:
            a["schema"] = a["schema"] or schema
            a["rows"].update(tuple(r) for r in good)
        return {
            "audience_id": a["id"], "session_id": session.get("session_id"), "num_received": len(good) + invalid,
            "num_invalid_entries": invalid, "invalid_entry_samples": samples,
        }  # fmt: skip

    def _replace(self, a: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
        session = self._json_param(p, "session") or {}
        sid, seq = session.get("session_id"), int(session.get("batch_seq", 0))
        last = bool(session.get("last_batch_flag"))
        rep = a.get("replace")
        if seq == 1 and rep is None:
            rep = a["replace"] = {"session_id": sid, "started": time.time(), "seq": 0, "rows": set()}
            a["operation_status"] = 414
        if rep is None or rep["session_id"] != sid:
            raise GraphError(100, "Invalid replace session: start with batch_seq 1 and one session at a time")
        if seq != rep["seq"] + 1 and seq != rep["seq"]:
            raise GraphError(100, f"Invalid batch_seq {seq}: expected {rep['seq'] + 1}")
        if time.time() - rep["started"] > REPLACE_WINDOW_SECONDS:
            a["replace"], a["operation_status"] = None, 415
            raise GraphError(100, "The replace session expired (90 minutes)")
        saved_schema = a["schema"]
        a["schema"] = None  # a replace may set a new schema
        try:
            schema, good, invalid, samples = self._rows(a, p)
        finally:
            a["schema"] = saved_schema
        rep["schema"] = schema
        rep["rows"].update(tuple(r) for r in good)
        rep["seq"] = seq
        if last:
            a["rows"], a["schema"] = rep["rows"], schema
            a["replace"], a["operation_status"] = None, 200
        return {
            "audience_id": a["id"], "session_id": sid, "num_received": len(good) + invalid,
            "num_invalid_entries": invalid, "invalid_entry_samples": samples,
        }  # fmt: skip


def start_meta_emulator(state_file: Path | None = None, **kwargs: Any) -> MetaGraphEmulator:
    emu = MetaGraphEmulator(state_file=state_file, **kwargs)
    emu.start()
    return emu
