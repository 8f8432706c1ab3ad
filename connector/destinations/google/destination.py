"""`GoogleDestination`: Customer Match through the Data Manager API.

The Data Manager API is the Customer Match path open to new integrations since 2026-04.
Uploads are acknowledged with a request id and processed later: members are `accepted` when
the request is acknowledged and `confirmed` when `reconcile` reads the request status (at the
end of the run, or on the next run). A full refresh notes the time T, ingests every member,
waits for those requests, then removes everything ingested before T.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.auth.credentials import AnonymousCredentials, Credentials

from connector.destinations.base import (
    AudienceRef,
    AudienceStatus,
    BatchResult,
    BatchSession,
    Capabilities,
    LookalikeRef,
    Member,
    Platform,
    RequestOutcome,
)
from connector.destinations.google.datamanager_client import SCOPE, DataManagerClient, list_summary
from connector.errors import ConfigError, RetriableError
from connector.retry import RetryPolicy, RetryStats, policy_from
from connector.settings import GoogleDestinationConfig

log = logging.getLogger("connector.google")

MAX_MEMBERS = 10_000
STATUS_POLL_SECONDS = 2.0


def load_credentials(name: str, config: GoogleDestinationConfig, base_dir: Path | None = None) -> Credentials:
    """Service account JSON, or an OAuth refresh token (client id + secret), from the config/env."""
    if config.service_account_file is not None:
        from google.oauth2 import service_account

        path = config.service_account_file
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise ConfigError(f"destinations.{name}.service_account_file: {path} not found")
        return service_account.Credentials.from_service_account_file(str(path), scopes=[SCOPE])  # type: ignore[no-untyped-call,no-any-return]
    if config.oauth_refresh_token is not None:
        if not config.oauth_client_id or config.oauth_client_secret is None:
            raise ConfigError(f"destinations.{name}: oauth_refresh_token needs oauth_client_id and oauth_client_secret")
        from google.oauth2.credentials import Credentials as OAuthCredentials

        return OAuthCredentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=config.oauth_refresh_token.get_secret_value(),
            client_id=config.oauth_client_id,
            client_secret=config.oauth_client_secret.get_secret_value(),
            token_uri="https://oauth2.googleapis.com/token",  # noqa: S106 - a URL, not a secret
            scopes=[SCOPE],
        )
    raise ConfigError(
        f"destinations.{name}: no Google credentials: set service_account_file, or oauth_client_id + "
        f"oauth_client_secret + oauth_refresh_token (env CONNECTOR_DESTINATIONS__{name.upper()}__OAUTH_REFRESH_TOKEN), "
        "or sandbox = true"
    )


class GoogleDestination:
    platform: Platform = "google"

    def __init__(self, name: str, config: GoogleDestinationConfig, client: DataManagerClient, *,
                 policy: RetryPolicy, emulator: Any = None) -> None:  # fmt: skip
        if config.upload_api != "datamanager":
            raise ConfigError(
                f"destinations.{name}.upload_api = {config.upload_api!r}: only \"datamanager\" is available in this "
                "release (the Google Ads API upload path is for allowlisted tokens and is not built yet)"
            )
        self.name = name
        self.config = config
        self.client = client
        self.capabilities = Capabilities(max_batch_size=MAX_MEMBERS, supports_replace=True, supports_lookalike=True,
                                         confirms_async=True)  # fmt: skip
        self.emulator = emulator
        self._policy = policy
        self._sleep = policy.sleep or time.sleep
        self._lookalike_note_logged = False

    @classmethod
    def from_config(cls, name: str, config: GoogleDestinationConfig, state_dir: Path, *,
                    stats: RetryStats | None = None) -> GoogleDestination:  # fmt: skip
        emulator = None
        endpoint = config.datamanager_endpoint
        if config.sandbox:
            from connector.sandbox.google_datamanager import start_datamanager_emulator

            emulator = start_datamanager_emulator(state_dir / f"sandbox-google-dm-{name}.json")
            endpoint = emulator.url
            credentials: Credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
            log.warning("destination %s is a SANDBOX: Data Manager API emulator at %s, no real Google account", name,
                        endpoint)  # fmt: skip
        else:
            credentials = load_credentials(name, config, state_dir.parent)
        policy = policy_from(config)
        client = DataManagerClient(customer_id=config.customer_id, login_customer_id=config.login_customer_id,
                                   credentials=credentials, endpoint=endpoint, timeout=config.timeout_seconds,
                                   policy=policy, stats=stats)  # fmt: skip
        try:
            return cls(name, config, client, policy=policy, emulator=emulator)
        except ConfigError:
            client.close()
            if emulator is not None:
                emulator.stop()
            raise

    def close(self) -> None:
        self.client.close()
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None

    # ------------------------------------------------------------------ audiences

    def ensure_audience(self, segment: str, known: AudienceRef | None, schema: Sequence[str]) -> AudienceRef:
        if known is not None:
            if self.client.get_list(known.audience_id) is not None:
                return known
            log.warning("Google user list %s of %s no longer exists; creating a new one", known.audience_id, segment)
        existing = self.client.find_list(segment)
        if existing is None:
            try:
                existing = self.client.create_list(segment, self.config.membership_days,
                                                   "Managed by connector: members are synced from a segment")  # fmt: skip
            except RetriableError:
                # the create may have landed before the connection dropped: look before failing
                existing = self.client.find_list(segment)
                if existing is None:
                    raise
        return AudienceRef(str(existing.id), segment, {"resource_name": existing.name, "schema": ",".join(schema)})

    # ------------------------------------------------------------------ members

    def add_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"a Data Manager request holds at most {MAX_MEMBERS} members, got {len(members)}")
        rid = self.client.ingest(audience.audience_id, members)
        return BatchResult(request_id=rid, pending=True, received=len(members))

    def remove_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"a Data Manager request holds at most {MAX_MEMBERS} members, got {len(members)}")
        rid = self.client.remove(audience.audience_id, members)
        return BatchResult(request_id=rid, received=len(members))

    def replace_members(self, audience: AudienceRef, batches: Iterator[Sequence[Member]], total: int) -> BatchResult:
        # the platform's clock decides what "before T" means; a small margin covers clock skew
        started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        request_ids = [self.client.ingest(audience.audience_id, batch) for batch in batches if batch]
        self._wait(request_ids)
        self.client.remove_all(audience.audience_id, started)
        return BatchResult(request_id=request_ids[-1] if request_ids else None, pending=False)

    def _wait(self, request_ids: Sequence[str]) -> None:
        deadline = time.monotonic() + self.config.timeout_seconds * 10
        waiting = list(request_ids)
        while waiting:
            still = []
            for rid in waiting:
                state, _ = self.client.request_status(rid)
                if state == "FAILED":
                    raise RetriableError(f"Google: ingest request failed during a full refresh ({state})", code=state)
                if state == "PROCESSING":
                    still.append(rid)
            waiting = still
            if waiting:
                if time.monotonic() > deadline:
                    raise RetriableError("Google: ingest requests still processing; full refresh will be retried")
                self._sleep(STATUS_POLL_SECONDS)

    def finish(self, audience: AudienceRef) -> None:
        return None

    def reconcile(self, audience: AudienceRef, request_ids: Sequence[str]) -> Mapping[str, RequestOutcome]:
        out: dict[str, RequestOutcome] = {}
        for rid in request_ids:
            state, errors = self.client.request_status(rid)
            reason = ", ".join(f"{k}={v}" for k, v in sorted(errors.items())) or None
            if state == "PROCESSING":
                out[rid] = RequestOutcome("pending")
            elif state in ("SUCCESS", "PARTIAL_SUCCESS"):
                # Data Manager reports counts per reason, not which members: partial errors are logged
                if errors:
                    log.warning("Google request %s: %s", rid, reason)
                out[rid] = RequestOutcome("succeeded", reason)
            else:
                out[rid] = RequestOutcome("failed", f"{state}{': ' + reason if reason else ''}")
        return out

    def audience_status(self, audience: AudienceRef) -> AudienceStatus:
        ul = self.client.get_list(audience.audience_id)
        if ul is None:
            return AudienceStatus(audience.audience_id, state="missing")
        s = list_summary(ul)
        return AudienceStatus(
            audience.audience_id, size_lower=s["size_search"], size_upper=s["size_search"], match_rate=s["match_rate"],
            state=s["membership_status"].lower(),
            details={"size_display": str(s["size_display"]), "size_search": str(s["size_search"])},
        )  # fmt: skip

    # ------------------------------------------------------------------ lookalikes

    def ensure_lookalike(self, audience: AudienceRef, spec: Mapping[str, object], known: LookalikeRef | None,
                         seed_size: int) -> LookalikeRef | None:  # fmt: skip
        if known is not None:
            return known
        note = ("lookalike skipped: Google lookalike segments are created through the Google Ads API, which needs "
                "developer_token and customer_id and is not available in this release")  # fmt: skip
        if not self._lookalike_note_logged:
            log.warning("%s: %s", self.name, note)
            self._lookalike_note_logged = True
        # an empty id tells the engine "not created, and not waiting for the seed either"
        return LookalikeRef("", f"skipped: {note.removeprefix('lookalike skipped: ')}")
