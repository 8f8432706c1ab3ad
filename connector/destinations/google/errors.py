"""Google error classification, shared by the Data Manager and Google Ads API clients.

Classified by Google's own codes (gRPC/REST status names, Google Ads error code names), never by
HTTP status alone. Messages carry the code and a fixed explanation: never the request, which
holds hashes, nor credentials.
"""

from __future__ import annotations

import re

from google.api_core import exceptions as gexc

from connector.errors import (
    AuthError,
    ConnectorError,
    DestinationError,
    FatalError,
    QuotaExhaustedError,
    RetriableError,
    TermsNotAcceptedError,
    ThrottledError,
)

# REST answers carry an HTTP code; some api_core classes have no gRPC status attached (403 -> Forbidden)
_HTTP_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 409: "ABORTED",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}  # fmt: skip
_URL_PREFIX = re.compile(r"^[A-Z]+ https?://\S+: ")
RETRIABLE_STATUS = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})
RETRIABLE_ADS = frozenset({"CONCURRENT_MODIFICATION", "INTERNAL_ERROR", "TRANSIENT_ERROR",
                           "RESOURCE_TEMPORARILY_EXHAUSTED"})  # fmt: skip
_ADS_MESSAGES = {
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE": (
        "this developer token may not upload Customer Match data through the Google Ads API (closed to new "
        "integrations since 2026-04); set upload_api = \"datamanager\" for this destination"
    ),
    "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS": (
        "the Customer Match data terms are not accepted for this account: accept them in Google Ads "
        "(Tools > Audience manager), or check the consent sent with the members"
    ),
    "INVALID_SHA256_FORMAT": "a hashed identifier is not SHA-256 hex (a normalization bug: please report it)",
    "INCOMPATIBLE_UPLOAD_KEY_TYPE": "the user list's upload key type does not accept these identifiers",
    "NAME_ALREADY_USED": "a user list with this name already exists",
    "CAN_NOT_MUTATE_SENSITIVE_USERLIST": "the user list is sensitive and cannot be changed",
    "INVALID_MEMBERSHIP_LIFE_SPAN": "membership life span too high: at most 540 days",
    "MEMBERSHIP_LIFE_SPAN_TOO_HIGH": "membership life span too high: at most 540 days",
    "RESOURCE_EXHAUSTED": "the daily API quota is used up; the sync is rescheduled",
}


def classify_ads_error_code(name: str) -> type[DestinationError]:
    """Error class for a Google Ads API error code name (e.g. from GoogleAdsFailure)."""
    if name in RETRIABLE_ADS:
        return RetriableError
    if name == "RESOURCE_EXHAUSTED":
        return QuotaExhaustedError
    if name == "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS":
        return TermsNotAcceptedError
    if name in ("USER_PERMISSION_DENIED", "AUTHENTICATION_ERROR", "OAUTH_TOKEN_EXPIRED", "DEVELOPER_TOKEN_NOT_APPROVED",
                "NOT_ADS_USER", "CUSTOMER_NOT_ENABLED", "PERMISSION_DENIED"):  # fmt: skip
        return AuthError
    return FatalError


def ads_error(name: str, what: str) -> DestinationError:
    cls = classify_ads_error_code(name)
    hint = _ADS_MESSAGES.get(name, "request refused")
    return cls(f"Google {what}: {hint} ({name})", code=name)


def map_google_api_error(exc: Exception, what: str) -> ConnectorError:
    """google.api_core exceptions (REST and gRPC) -> connector errors."""
    if isinstance(exc, gexc.GoogleAPICallError):
        status = exc.grpc_status_code.name if exc.grpc_status_code is not None else _HTTP_STATUS.get(exc.code or 0, "")
        if status == "RESOURCE_EXHAUSTED" or isinstance(exc, gexc.TooManyRequests):
            text = (exc.message or "").lower()
            if "daily" in text or ("quota" in text and "rate" not in text):
                return QuotaExhaustedError(f"Google {what}: quota exhausted ({status}); rescheduled", code=status)
            return ThrottledError(f"Google {what}: rate limited ({status or 429})", code=status or 429)
        if status in RETRIABLE_STATUS or isinstance(exc, gexc.ServerError):
            return RetriableError(f"Google {what}: transient error ({status or exc.code})", code=status or exc.code)
        if status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return AuthError(
                f"Google {what}: {status.lower().replace('_', ' ')}: check the OAuth credentials, that they have the "
                "https://www.googleapis.com/auth/datamanager scope, and access to the customer id",
                code=status,
            )
        if status == "NOT_FOUND":
            return FatalError(f"Google {what}: not found ({status})", code=status)
        return FatalError(f"Google {what}: request refused ({status or exc.code}): {_short(exc.message)}", code=status)
    if isinstance(exc, gexc.RetryError | TimeoutError | ConnectionError):
        return RetriableError(f"Google {what}: {type(exc).__name__}", code="network")
    return RetriableError(f"Google {what}: {type(exc).__name__}", code="network")


def _short(message: str | None) -> str:
    # Google's messages name fields, not values; the REST client prefixes "METHOD url: ", drop it
    text = (message or "").split("\n", 1)[0]
    text = _URL_PREFIX.sub("", text)
    return text[:200]
