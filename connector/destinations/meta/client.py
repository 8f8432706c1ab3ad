"""Graph API client for custom audiences: the only module that imports facebook-business.

Every call goes through httpx, not the SDK's request path: the SDK puts ``access_token`` in the
URL query string, has no timeout or retries, treats a 5xx body without an ``error`` key as
success, and its exception text includes the request payload (our hashes). The SDK still
supplies the object field and enum names, so our requests spell them as Meta's own client does.

The token travels in the ``Authorization`` header only. Errors are mapped here, at one boundary,
to `connector.errors` by Graph error code; messages carry the code and a fixed explanation, never
the payload or the token.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote_plus

import httpx
from facebook_business.adobjects.customaudience import CustomAudience
from pydantic import SecretStr

from connector.errors import (
    AuthError,
    DestinationError,
    FatalError,
    RetriableError,
    SkippableError,
    TermsNotAcceptedError,
    ThrottledError,
)
from connector.retry import RetryPolicy, RetryStats

log = logging.getLogger("connector.meta")

F = CustomAudience.Field
AUDIENCE_FIELDS = (
    F.id, F.name, F.subtype, F.approximate_count_lower_bound, F.approximate_count_upper_bound,
    F.operation_status, F.delivery_status, F.lookalike_spec, F.origin_audience_id, F.is_value_based,
)  # fmt: skip
SUBTYPE_CUSTOM = CustomAudience.Subtype.custom
SUBTYPE_LOOKALIKE = CustomAudience.Subtype.lookalike

THROTTLE_CODES = frozenset({4, 17, 32, 613, 80003, 80004})
# form encoding of the characters a JSON payload is made of, in this order: "%" first, then "+" (spaces become "+")
_FORM_ESCAPES = (*((c, f"%{ord(c):02X}") for c in '%+",:[]{}\\/'), (" ", "+"))
_FORM_LEFT = re.compile(r"[^A-Za-z0-9_.~%+-]")  # anything else left after the escapes: quote_plus does it all
TRANSIENT_CODES = frozenset({1, 2})
TERMS_SUBCODES = frozenset({1870090, 1870034})
SIZE_TOO_LOW = "audience size too low"

_PERMANENT_HINTS = {
    100: "invalid parameter (check the ad account id and the audience settings)",
    2650: "the rows do not match the audience's schema (one multi-key schema per audience)",
    2654: "a lookalike with the same seed, country and ratio already exists",
    2655: "the audience cannot be changed right now (a replace is running or it is a lookalike)",
}


def terms_url(ad_account_id: str) -> str:
    return f"https://business.facebook.com/ads/manage/customaudiences/tos/?act={ad_account_id}"


def _regain_seconds(headers: httpx.Headers) -> float | None:
    """Meta's own estimate from X-Business-Use-Case-Usage (minutes), if it gives one."""
    raw = headers.get("x-business-use-case-usage")
    if not raw:
        return None
    try:
        usage = json.loads(raw)
        minutes = [float(entry.get("estimated_time_to_regain_access", 0) or 0) for entries in usage.values() for entry in entries]
    except (ValueError, AttributeError, TypeError):
        return None
    return max(minutes) * 60 if minutes else None


def _quote_plus(value: str) -> str:
    """`urllib.parse.quote_plus`, with `str.replace` for the characters of a JSON payload: a megabyte payload
    takes milliseconds, not the tenth of a second `quote_plus` spends on it byte by byte."""
    if not value.isascii():
        return quote_plus(value)
    out = value
    for char, escape in _FORM_ESCAPES:
        if char in out:
            out = out.replace(char, escape)
    return quote_plus(value) if _FORM_LEFT.search(out) else out


def form_body(data: Mapping[str, Any]) -> bytes:
    """An ``application/x-www-form-urlencoded`` body, as httpx writes `data=` (booleans as true/false, None as "")."""

    def text(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else "" if v is None else str(v)

    return "&".join(f"{_quote_plus(k)}={_quote_plus(text(v))}" for k, v in data.items()).encode()


def map_graph_error(status: int, body: Any, headers: httpx.Headers, what: str, ad_account_id: str) -> DestinationError:
    """Graph error body (or its absence) -> the most specific connector error."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        if status >= 500 or status == 429:
            return RetriableError(f"Meta {what}: HTTP {status} without a Graph error body", code=status)
        return FatalError(f"Meta {what}: HTTP {status} without a Graph error body", code=status)
    code = int(err.get("code") or 0)
    sub = err.get("error_subcode")
    message = str(err.get("message", ""))
    if code in THROTTLE_CODES:
        wait = _regain_seconds(headers)
        return ThrottledError(f"Meta {what}: rate limited (code {code})", code=code, retry_after=wait)
    if code in TRANSIENT_CODES or err.get("is_transient") or status >= 500:
        return RetriableError(f"Meta {what}: transient error (code {code})", code=code)
    if code == 190:
        return AuthError(
            f"Meta {what}: the access token is invalid or expired (code 190). Long-lived tokens expire after "
            "about 60 days: create a new system-user token in Business Settings and set "
            "CONNECTOR_DESTINATIONS__<NAME>__ACCESS_TOKEN.",
            code=code,
        )
    if code == 200 and sub in TERMS_SUBCODES:
        return TermsNotAcceptedError(
            f"Meta {what}: the Custom Audience terms are not accepted for ad account act_{ad_account_id} "
            f"(code 200/{sub}). Accept them at {terms_url(ad_account_id)} and run again.",
            code=code,
        )
    if code in (10, 200) or 200 <= code <= 299:
        return AuthError(
            f"Meta {what}: permission denied (code {code}). The token needs ads_management on ad account act_{ad_account_id}.",
            code=code,
        )
    if SIZE_TOO_LOW in message.lower():
        return SkippableError(f"Meta {what}: {SIZE_TOO_LOW}; the removal is kept and retried later", code=code)
    hint = _PERMANENT_HINTS.get(code, "request refused")
    return FatalError(f"Meta {what}: {hint} (code {code}{f'/{sub}' if sub else ''})", code=code)


class GraphClient:
    """Minimal Graph API client with the token in a header, timeouts, status checks, retries."""

    def __init__(self, *, graph_url: str, api_version: str, token: SecretStr, ad_account_id: str,
                 timeout: float, policy: RetryPolicy, stats: RetryStats | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:  # fmt: skip
        self.ad_account_id = ad_account_id
        self._policy = policy
        self._stats = stats
        self._token = token
        self._http = httpx.Client(
            base_url=f"{graph_url.rstrip('/')}/{api_version}",
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            headers={"User-Agent": "connector-audience-sync"},
        )

    def close(self) -> None:
        self._http.close()

    def _once(self, method: str, path: str, what: str, params: Mapping[str, Any] | None,
              data: Mapping[str, Any] | None) -> Any:  # fmt: skip
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"}
        content = None
        if data is not None:
            content = form_body(data)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            resp = self._http.request(method, path, params=params, content=content, headers=headers)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            # the connection dropped: the write may or may not have been applied; both are idempotent
            raise RetriableError(f"Meta {what}: {type(exc).__name__}", code="network") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400 or body is None or (isinstance(body, dict) and "error" in body):
            raise map_graph_error(resp.status_code, body, resp.headers, what, self.ad_account_id)
        return body

    def call(self, method: str, path: str, what: str, *, params: Mapping[str, Any] | None = None,
             data: Mapping[str, Any] | None = None, retry: bool = True) -> Any:  # fmt: skip
        if not retry:
            return self._once(method, path, what, params, data)
        return self._policy.call(lambda: self._once(method, path, what, params, data), what=f"Meta {what}",
                                 stats=self._stats)  # fmt: skip

    # -------------------------------------------------------------- audience objects

    def tos_accepted(self) -> bool:
        body = self.call("GET", f"/act_{self.ad_account_id}", "read ad account", params={"fields": "tos_accepted"})
        tos = body.get("tos_accepted") or {}
        return bool(tos.get("custom_audience_tos"))

    def list_audiences(self, fields: tuple[str, ...] = (F.id, F.name)) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"fields": ",".join(fields), "limit": 500}
        path = f"/act_{self.ad_account_id}/customaudiences"
        for _ in range(200):
            body = self.call("GET", path, "list audiences", params=params)
            out.extend(body.get("data", []))
            after = ((body.get("paging") or {}).get("cursors") or {}).get("after")
            if not after or not (body.get("paging") or {}).get("next"):
                break
            params = {**params, "after": after}
        return out

    def get_audience(self, audience_id: str) -> dict[str, Any] | None:
        try:
            fields = {"fields": ",".join(AUDIENCE_FIELDS)}
            return dict(self.call("GET", f"/{audience_id}/", "read audience", params=fields))
        except FatalError as exc:
            if exc.code == 100:
                return None  # deleted in the UI, or never existed
            raise

    def create_custom_audience(self, name: str, description: str, customer_file_source: str,
                               value_based: bool = False) -> str:  # fmt: skip
        data = {F.name: name, F.subtype: SUBTYPE_CUSTOM, F.description: description,
                F.customer_file_source: customer_file_source}  # fmt: skip
        if value_based:
            # a value-based custom audience, as the value-based lookalikes guide creates it (is_value_based=1)
            data[F.is_value_based] = "1"
        body = self.call(
            "POST", f"/act_{self.ad_account_id}/customaudiences", "create audience", data=data,
            retry=False,  # a retried create could duplicate the audience; the caller looks it up first
        )  # fmt: skip
        return str(body["id"])

    def create_lookalike(self, name: str, origin_id: str, spec: Mapping[str, Any]) -> str:
        body = self.call(
            "POST", f"/act_{self.ad_account_id}/customaudiences", "create lookalike",
            data={F.name: name, F.subtype: SUBTYPE_LOOKALIKE, F.origin_audience_id: origin_id,
                  F.lookalike_spec: json.dumps(dict(spec))},
            retry=False,
        )  # fmt: skip
        return str(body["id"])

    # -------------------------------------------------------------- members

    def upload(self, audience_id: str, endpoint: str, payload: str, session: Mapping[str, Any],
               delete: bool = False) -> dict[str, Any]:  # fmt: skip
        """`payload` is the JSON text of {"schema": [...], "data": [[...], ...]}."""
        data = {"payload": payload, "session": json.dumps(dict(session))}
        if delete:
            data["method"] = "DELETE"  # the SDK's remove_users puts the payload in the URL: never
        what = {"users": "remove members" if delete else "add members", "usersreplace": "replace members"}[endpoint]
        return dict(self.call("POST", f"/{audience_id}/{endpoint}", what, data=data))
