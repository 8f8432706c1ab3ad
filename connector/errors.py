"""One error tree for `connector`, grouped by what the caller does about it.

::

    ConnectorError
    ├── ConfigError                  bad config file, env or CLI usage            -> exit code 2
    ├── SourceError                  a source could not be read (whole source)    -> that segment fails
    ├── LedgerError                  the ledger database is unusable              -> run fails
    ├── GuardrailError               a plan would remove too much / empty source  -> pair stops, --force
    ├── LockHeldError                another process syncs this pair now          -> wait or exit 1
    └── DestinationError             anything a platform call raised, mapped at the client boundary
        ├── RetriableError           try again with backoff (5xx, transient codes, dropped connection)
        │   └── ThrottledError       the platform asked us to slow down; carries `retry_after` seconds
        ├── QuotaExhaustedError      a daily/hourly quota: stop this pair now, reschedule, never spin
        ├── FatalError               permanent: stop this destination, tell the user what to do
        │   ├── AuthError            token expired/invalid, permission missing
        │   └── TermsNotAcceptedError customer data terms / custom audience ToS not accepted
        └── SkippableError           one item was refused (e.g. "audience size too low" on removal):
                                     record it and retry on a later run; the batch and run go on

Row-level identifier problems are not exceptions: they are counted per reason code by
`connector.identifiers` and never fail a batch.

Messages never contain tokens, request payloads or identifiers: client modules build them from
the platform's error code and a short fixed explanation, and chain the SDK exception with
``raise ... from exc`` only after scrubbing (see each platform's ``client.py``).
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error `connector` raises on purpose."""


class ConfigError(ConnectorError):
    """The configuration (file, env, CLI usage) is invalid. Names the file, key and expectation."""


class SourceError(ConnectorError):
    """A segment's source could not be read at all (file missing, SQL error, HTTP failure)."""


class LedgerError(ConnectorError):
    """The ledger database cannot be opened or written."""


class GuardrailError(ConnectorError):
    """A plan was stopped before anything was sent because it looks like a mistake."""


class LockHeldError(ConnectorError):
    """Another process holds the lock of this (segment, destination) pair."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


class DestinationError(ConnectorError):
    """A platform call failed. `code` is the platform's own error code when there is one."""

    def __init__(self, message: str, *, code: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RetriableError(DestinationError):
    """Transient: the same call may succeed later (5xx, transient codes, connection dropped)."""


class ThrottledError(RetriableError):
    """The platform asked us to slow down. `retry_after` is its own estimate in seconds, if any."""

    def __init__(
        self, message: str, *, code: str | int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class QuotaExhaustedError(DestinationError):
    """A quota that takes hours to refill: stop this pair and let the scheduler come back."""


class FatalError(DestinationError):
    """Permanent for this destination until a human acts; the message says what to do."""


class AuthError(FatalError):
    """Credentials are invalid, expired or lack a permission."""


class TermsNotAcceptedError(FatalError):
    """The platform's customer data terms have not been accepted for this account."""


class SkippableError(DestinationError):
    """One item was refused; record it, keep going, try it again on a later run."""
