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
from connector.destinations.google.ads_client import GoogleAdsApi
from connector.destinations.google.datamanager_client import SCOPE, DataManagerClient, list_summary
from connector.errors import ConfigError, RetriableError
from connector.retry import RetryPolicy, RetryStats, policy_from
from connector.settings import CUSTOMER_MATCH_TERMS_REQUIRED, GoogleDestinationConfig

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

    def __init__(self, name: str, config: GoogleDestinationConfig, client: DataManagerClient | None, *,
                 policy: RetryPolicy, emulator: Any = None, ads: GoogleAdsApi | None = None,
                 ads_emulator: Any = None) -> None:  # fmt: skip
        if config.customer_match_terms != "accepted":
            raise ConfigError(f"destinations.{name}: {CUSTOMER_MATCH_TERMS_REQUIRED}")
        if config.upload_api == "google_ads" and ads is None:
            raise ConfigError(f"destinations.{name}: upload_api = \"google_ads\" needs developer_token")
        if config.upload_api == "datamanager" and client is None:
            raise ConfigError(f"destinations.{name}: the Data Manager client is missing")
        self.name = name
        self.ads = ads
        self.ads_emulator = ads_emulator
        self._use_ads = config.upload_api == "google_ads"
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
        emulator = ads_emulator = None
        credentials: Credentials
        endpoint, ads_endpoint = config.datamanager_endpoint, config.google_ads_endpoint
        developer_token = config.developer_token.get_secret_value() if config.developer_token else None
        if config.sandbox and (endpoint or ads_endpoint):
            # emulators already running elsewhere (another process, e.g. a test harness): no account
            from connector.sandbox.google_ads import SANDBOX_DEVELOPER_TOKEN

            developer_token = developer_token or SANDBOX_DEVELOPER_TOKEN
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
            log.warning("destination %s is a SANDBOX: running Google emulators (Data Manager %s, Google Ads %s)",
                        name, endpoint, ads_endpoint)  # fmt: skip
        elif config.sandbox:
            from connector.sandbox.google_ads import start_google_ads_emulator
            from connector.sandbox.google_datamanager import start_datamanager_emulator

            dm_emu = start_datamanager_emulator(state_dir / f"sandbox-google-dm-{name}.arrow")
            emulator = dm_emu

            # one account: Data Manager list ids are Google Ads user list ids
            ads_emulator = start_google_ads_emulator(state_dir / f"sandbox-google-ads-{name}.arrow",
                                                     seed_sizes=dm_emu.member_count)  # fmt: skip
            endpoint, ads_endpoint = dm_emu.url, ads_emulator.endpoint
            developer_token = ads_emulator.developer_token
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
            log.warning("destination %s is a SANDBOX: Google emulators (Data Manager %s, Google Ads %s), no real "
                        "Google account", name, endpoint, ads_endpoint)  # fmt: skip
        else:
            credentials = load_credentials(name, config, state_dir.parent)
        policy = policy_from(config)
        client = None
        if config.upload_api == "datamanager":
            client = DataManagerClient(customer_id=config.customer_id, login_customer_id=config.login_customer_id,
                                       credentials=credentials, endpoint=endpoint, timeout=config.timeout_seconds,
                                       policy=policy, stats=stats)  # fmt: skip
        ads = None
        if developer_token:
            from connector.destinations.google.ads_client import GoogleAdsApi

            ads = GoogleAdsApi(customer_id=config.customer_id, login_customer_id=config.login_customer_id,
                               developer_token=developer_token, credentials=credentials, endpoint=ads_endpoint,
                               timeout=config.timeout_seconds, policy=policy, stats=stats)  # fmt: skip
        try:
            return cls(name, config, client, policy=policy, emulator=emulator, ads=ads, ads_emulator=ads_emulator)
        except ConfigError:
            if client is not None:
                client.close()
            for emu in (emulator, ads_emulator):
                if emu is not None:
                    emu.stop()
            raise

    @property
    def _dm(self) -> DataManagerClient:
        if self.client is None:
            raise ConfigError(f"destinations.{self.name}: the Data Manager client is not configured")
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.ads is not None:
            self.ads.close()
        for emu in (self.emulator, self.ads_emulator):
            if emu is not None:
                emu.stop()
        self.emulator = self.ads_emulator = None

    # ------------------------------------------------------------------ audiences

    def ensure_audience(self, segment: str, known: AudienceRef | None, schema: Sequence[str], *,
                        value_based: bool = False) -> AudienceRef:  # fmt: skip
        if self._use_ads:
            assert self.ads is not None
            lid = self.ads.ensure_crm_list(segment, known.audience_id if known else None, self.config.membership_days)
            resumed = self.ads.resume_pending_jobs(lid)
            if resumed:
                log.warning("Google Ads list %s: ran %d job(s) an interrupted run had filled but not run", lid,
                            len(resumed))  # fmt: skip
            extra = {"schema": ",".join(schema), "upload_api": "google_ads"}
            if value_based:
                # members carry lifetime value: added in jobs of type CUSTOMER_MATCH_WITH_ATTRIBUTES
                extra["attributes"] = "lifetime_value"
            return AudienceRef(lid, segment, extra)
        if known is not None:
            if self._dm.get_list(known.audience_id) is not None:
                return known
            log.warning("Google user list %s of %s no longer exists; creating a new one", known.audience_id, segment)
        existing = self._dm.find_list(segment)
        if existing is None:
            try:
                existing = self._dm.create_list(segment, self.config.membership_days,
                                                   "Managed by connector: members are synced from a segment")  # fmt: skip
            except RetriableError:
                # the create may have landed before the connection dropped: look before failing
                existing = self._dm.find_list(segment)
                if existing is None:
                    raise
        return AudienceRef(str(existing.id), segment, {"resource_name": existing.name, "schema": ",".join(schema)})

    # ------------------------------------------------------------------ members

    def add_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"a Data Manager request holds at most {MAX_MEMBERS} members, got {len(members)}")
        if self._use_ads:
            assert self.ads is not None
            return self.ads.stage(audience.audience_id, members, remove=False, attributes=_attributes(audience))
        rid = self._dm.ingest(audience.audience_id, members)
        return BatchResult(request_id=rid, pending=True, received=len(members))

    def remove_members(self, audience: AudienceRef, members: Sequence[Member], session: BatchSession) -> BatchResult:
        if len(members) > MAX_MEMBERS:
            raise ValueError(f"a Data Manager request holds at most {MAX_MEMBERS} members, got {len(members)}")
        if self._use_ads:
            assert self.ads is not None
            return self.ads.stage(audience.audience_id, members, remove=True)
        rid = self._dm.remove(audience.audience_id, members)
        return BatchResult(request_id=rid, received=len(members))

    def replace_members(self, audience: AudienceRef, batches: Iterator[Sequence[Member]], total: int) -> BatchResult:
        if self._use_ads:
            assert self.ads is not None
            return self.ads.replace(audience.audience_id, batches, total, attributes=_attributes(audience))
        # the platform's clock decides what "before T" means; a small margin covers clock skew
        started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        request_ids = [self._dm.ingest(audience.audience_id, batch) for batch in batches if batch]
        self._wait(request_ids)
        self._dm.remove_all(audience.audience_id, started)
        return BatchResult(request_id=request_ids[-1] if request_ids else None, pending=False)

    def _wait(self, request_ids: Sequence[str]) -> None:
        deadline = time.monotonic() + self.config.timeout_seconds * 10
        waiting = list(request_ids)
        while waiting:
            still = []
            for rid in waiting:
                state, _ = self._dm.request_status(rid)
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
        if self._use_ads:
            assert self.ads is not None
            self.ads.run_staged(audience.audience_id)

    def reconcile(self, audience: AudienceRef, request_ids: Sequence[str]) -> Mapping[str, RequestOutcome]:
        if self._use_ads:
            assert self.ads is not None
            return {rid: self.ads.job_outcome(rid) for rid in request_ids}
        out: dict[str, RequestOutcome] = {}
        for rid in request_ids:
            state, errors = self._dm.request_status(rid)
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
        if self._use_ads:
            assert self.ads is not None
            return self.ads.user_list_status(audience.audience_id)
        ul = self._dm.get_list(audience.audience_id)
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
        if self.ads is None:
            note = ("skipped: Google lookalike segments are created through the Google Ads API, which needs "
                    "developer_token (and customer_id)")  # fmt: skip
            if not self._lookalike_note_logged:
                log.warning("%s: lookalike %s", self.name, note)
                self._lookalike_note_logged = True
            # an empty id tells the engine "not created, and not waiting for the seed either"
            return LookalikeRef("", note)
        level = str(spec.get("expansion_level", "BALANCED"))
        countries = ",".join(str(c) for c in spec.get("country_codes", []) or [])  # type: ignore[attr-defined]
        name = f"Lookalike ({level.lower()}{', ' + countries if countries else ''}) of {audience.name}"
        return self.ads.ensure_lookalike(audience.audience_id, name, spec, known, seed_size)


def _attributes(audience: AudienceRef) -> bool:
    """Whether the list's members carry attributes (lifetime value), Google Ads API path."""
    return bool(audience.extra.get("attributes"))
