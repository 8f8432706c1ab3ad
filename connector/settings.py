"""Settings: one TOML file plus environment, validated by pydantic-settings.

Environment variables use the ``CONNECTOR_`` prefix and ``__`` for nesting, e.g.
``CONNECTOR_DESTINATIONS__META_ADS__ACCESS_TOKEN``. They override the file. Secrets are
`SecretStr`: they print as ``**********`` and are only unwrapped at the client boundary.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connector.errors import ConfigError

DEFAULT_CONFIG = "connector.toml"

IdentifierField = Literal[
    "email", "phone", "first_name", "last_name", "zip", "country", "city", "state",
    "gender", "date_of_birth", "external_id", "mobile_ad_id",
]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(value: str | None) -> str | None:
    """Endpoint overrides: https anywhere, plain http only for loopback (emulators, proxies)."""
    if value is None:
        return None
    parts = urlsplit(value if "://" in value else f"https://{value}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(
            f"plain http is only allowed for loopback addresses (127.0.0.1, ::1, localhost); "
            f"use https for {parts.hostname!r}"
        )
    return value.rstrip("/")


# ----------------------------------------------------------------------------- sources


class ClvConfig(_Strict):
    """Predicted customer lifetime value, derived from a named source of orders (`connector.clv`)."""

    orders: str = Field(description="name of the [sources.NAME] table holding the orders")
    customer: str = Field(default="customer_id", description="orders column: the customer who ordered")
    time: str = Field(default="ordered_at", description="orders column: when (ISO date or timestamp)")
    amount: str = Field(default="amount", description="orders column: the order's value")
    key: str | None = Field(default=None, description="this source's column matching `customer`; default: the same name")
    horizon_days: int = Field(default=365, ge=1, le=3650, description="predict the value of this many days ahead")
    column: str = Field(default="clv", min_length=1, description="name of the added column")
    min_repeat_customers: int = Field(default=20, ge=1, description="fewer customers with a repeat order: no fit")

    @property
    def key_column(self) -> str:
        return self.key or self.customer


class _SourceBase(_Strict):
    clv: ClvConfig | None = Field(default=None, description="add a predicted-value column fitted on orders")


class CsvSource(_SourceBase):
    type: Literal["csv"]
    path: Path
    delimiter: str = ","
    encoding: str = "utf-8"


class ParquetSource(_SourceBase):
    type: Literal["parquet"]
    path: Path


class SqlSource(_SourceBase):
    type: Literal["sql"]
    url: SecretStr = Field(description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")
    query: str
    batch_size: int = Field(default=50_000, ge=1)


class HttpSource(_SourceBase):
    type: Literal["http"]
    url: str
    records_path: str = Field(default="data", description="dotted path of the member list")
    next_cursor_path: str | None = Field(default=None, description="dotted path of the next cursor")
    cursor_param: str = "cursor"
    next_url_path: str | None = Field(default=None, description="dotted path of the next page URL")
    headers: dict[str, str] = Field(default_factory=dict)
    auth_header: str = "Authorization"
    auth_token: SecretStr | None = None
    auth_scheme: str = "Bearer"
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_pages: int = Field(default=100_000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        checked = check_endpoint(v)
        assert checked is not None
        return checked


SourceConfig = Annotated[
    CsvSource | ParquetSource | SqlSource | HttpSource, Field(discriminator="type")
]

# ----------------------------------------------------------------------------- segments

TIER_COLUMN = "_tier"  # each member row of a tier segment carries its tier's name in this column
REST_TIER = "rest"
_TIER_NAME = re.compile(r"[A-Za-z0-9_]+")


class TiersConfig(_Strict):
    """Value tiers: ``{ by = "clv", high = 0.10, medium = 0.30 }`` ranks the source's rows by `by`
    (descending) and cuts them at cumulative shares: the top 10% are `high`, the next 20% `medium`, the
    others `rest` (or the tier given the share 1.0). Written in TOML, every key but `by` and `ascending`
    is a tier; `shares` is the parsed form."""

    by: str = Field(min_length=1, description="the column to rank by (numbers; NULL and non-numbers rank last)")
    ascending: bool = Field(default=False, description="rank the smallest values first")
    shares: dict[str, float] = Field(description="tier -> cumulative share of the ranked rows, ascending")

    @model_validator(mode="before")
    @classmethod
    def _tiers_as_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "shares" in data:
            return data
        named = {k: v for k, v in data.items() if k not in ("by", "ascending")}
        return {**{k: v for k, v in data.items() if k in ("by", "ascending")}, "shares": named}

    @field_validator("shares")
    @classmethod
    def _cuts(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError('name at least one tier with its cumulative share, e.g. { by = "clv", high = 0.10 }')
        for name, share in v.items():
            if not _TIER_NAME.fullmatch(name):
                raise ValueError(f"tier name {name!r}: use letters, digits and _ (it becomes part of a segment name)")
            if not 0 < share <= 1:
                raise ValueError(f"tier {name!r}: share {share} must be above 0 and at most 1 (0.10 = the top 10%)")
        ordered = sorted(v.items(), key=lambda kv: kv[1])
        if len({s for _, s in ordered}) != len(ordered):
            raise ValueError("two tiers have the same cumulative share; each tier's share must be larger than the previous one's")
        if ordered[-1][1] < 1 and REST_TIER in v:
            raise ValueError(f"tier {REST_TIER!r} is the implicit last tier (the rest); give it the share 1.0 or another name")
        if ordered[-1][1] < 1:
            ordered.append((REST_TIER, 1.0))
        return dict(ordered)

    @property
    def names(self) -> list[str]:
        """Tier names from the top down; the last takes every row left (and the rows without a value)."""
        return list(self.shares)


class TierOf(_Strict):
    """Set on the segments a tiered segment expands into: which segment and which of its tiers."""

    segment: str
    name: str



class ConsentConfig(_Strict):
    """Google consent per member: a column (true/false/granted/denied/1/0) or a default."""

    ad_user_data_column: str | None = None
    ad_personalization_column: str | None = None
    ad_user_data: Literal["granted", "denied", "unspecified"] = "granted"
    ad_personalization: Literal["granted", "denied", "unspecified"] = "granted"


class MetaLookalikeSpec(_Strict):
    country: str | None = None
    location_spec: dict[str, Any] | None = None
    ratio: float = Field(default=0.01, ge=0.01, le=0.20)
    starting_ratio: float | None = Field(default=None, ge=0.0, le=0.19)
    type: Literal["similarity", "reach", "custom_ratio"] | None = None
    min_seed_size: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _where(self) -> MetaLookalikeSpec:
        if not self.country and not self.location_spec:
            raise ValueError("a Meta lookalike needs `country` or `location_spec`")
        return self


class GoogleLookalikeSpec(_Strict):
    expansion_level: Literal["NARROW", "BALANCED", "BROAD"] = "BALANCED"
    country_codes: list[str] = Field(default_factory=list)
    min_seed_size: int = Field(default=1_000, ge=1)


class LookalikeConfig(_Strict):
    meta: MetaLookalikeSpec | None = None
    google: GoogleLookalikeSpec | None = None


class SegmentConfig(_Strict):
    source: SourceConfig | str = Field(description="a source table, or the name of a [sources.NAME] table")
    where: str | None = Field(default=None, min_length=1, description="SQL predicate over the source's columns")
    tiers: TiersConfig | None = None
    tier: TierOf | None = Field(default=None, description="set by the expansion of `tiers`, not in a config")
    key: str | None = Field(
        default=None, description="column that identifies a member; default: hash of identifiers"
    )
    identifiers: dict[IdentifierField, str] = Field(
        description="identifier -> source column, e.g. {email = 'email_address'}"
    )
    default_region: str = Field(default="US", description="phone/country default, ISO alpha-2")
    consent: ConsentConfig = Field(default_factory=ConsentConfig)
    destinations: list[str] = Field(min_length=1)
    mode: Literal["mirror", "add_only"] = "mirror"
    schedule: str | None = Field(default=None, description="cron expression")
    lookalike: LookalikeConfig = Field(default_factory=LookalikeConfig)
    max_remove_share: float | None = Field(default=None, ge=0.0, le=1.0)
    value: str | None = Field(
        default=None, description="column holding each member's value (e.g. lifetime value): value-based audiences"
    )
    value_resend_threshold: float | None = Field(
        default=None, ge=0.0, description="re-send a member's value only when it moved by more than this share"
    )
    description: str = ""

    @field_validator("value")
    @classmethod
    def _value_column(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("name the column that holds each member's value, e.g. value = \"lifetime_value\"")
        return v

    @model_validator(mode="after")
    def _value_not_an_identifier(self) -> SegmentConfig:
        if self.value is not None and self.value in self.identifiers.values():
            field = next(f for f, c in self.identifiers.items() if c == self.value)
            raise ValueError(f"value = {self.value!r} is also the column of identifier {field!r}: a member's value "
                             "must be a column of its own (a number such as lifetime value)")
        if self.value_resend_threshold is not None and self.value is None:
            raise ValueError("value_resend_threshold is set but `value` is not: name the value column first")
        return self

    @model_validator(mode="after")
    def _tier_set_by_expansion(self) -> SegmentConfig:
        if self.tier is not None and (self.tiers is None or self.tier.name not in self.tiers.shares):
            raise ValueError("`tier` is set when a segment with `tiers` is expanded; configure `tiers` instead")
        return self

    @field_validator("identifiers")
    @classmethod
    def _some_identifier(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("map at least one identifier to a column, e.g. {email = 'email'}")
        return v

    @field_validator("default_region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z]{2}", v):
            raise ValueError(f"expected an ISO-3166 alpha-2 country code such as 'US', got {v!r}")
        return v.upper()

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from croniter import croniter

        if not croniter.is_valid(v):
            raise ValueError(f"not a valid cron expression: {v!r} (e.g. '0 * * * *')")
        return v


# ----------------------------------------------------------------------------- destinations


class _DestinationBase(_Strict):
    sandbox: bool = Field(
        default=False, description="start the bundled emulator and send there (no real account)"
    )
    timeout_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=50)
    backoff_max_seconds: float = Field(default=60.0, gt=0)


class MetaDestinationConfig(_DestinationBase):
    type: Literal["meta"]
    ad_account_id: str = Field(description="numeric id, with or without act_")
    access_token: SecretStr | None = None
    graph_url: str | None = None
    api_version: str = "v26.0"
    customer_file_source: Literal[
        "USER_PROVIDED_ONLY", "PARTNER_PROVIDED_ONLY", "BOTH_USER_AND_PARTNER_PROVIDED"
    ] = "USER_PROVIDED_ONLY"
    refresh_interval_days: int | None = Field(default=None, ge=1)
    replace_timeout_seconds: float = Field(default=90 * 60, gt=0)

    _v_graph_url = field_validator("graph_url")(classmethod(lambda cls, v: check_endpoint(v)))

    @field_validator("ad_account_id")
    @classmethod
    def _act(cls, v: str) -> str:
        digits = v.removeprefix("act_")
        if not digits.isdigit():
            raise ValueError(f"expected a numeric ad account id like 'act_1234567890', got {v!r}")
        return digits


CUSTOMER_MATCH_TERMS_URL = "https://support.google.com/adspolicy/answer/6299717"
CUSTOMER_MATCH_TERMS_REQUIRED = (
    'set customer_match_terms = "accepted": Google accepts Customer Match data only from advertisers who '
    f"accepted the Customer Match terms of service ({CUSTOMER_MATCH_TERMS_URL}); accepting them is the "
    "advertiser's decision, so the connector never assumes it"
)


class GoogleDestinationConfig(_DestinationBase):
    type: Literal["google"]
    upload_api: Literal["datamanager", "google_ads"] = "datamanager"
    customer_id: str = Field(description="Google Ads customer id (operating account), digits")
    login_customer_id: str | None = None
    developer_token: SecretStr | None = None
    service_account_file: Path | None = None
    oauth_client_id: str | None = None
    oauth_client_secret: SecretStr | None = None
    oauth_refresh_token: SecretStr | None = None
    datamanager_endpoint: str | None = None
    google_ads_endpoint: str | None = None
    membership_days: int = Field(default=540, ge=1, le=540)
    resend_before_expiry_days: int = Field(default=30, ge=0)
    customer_match_terms: Literal["accepted"] | None = Field(
        default=None, validate_default=True,
        description="\"accepted\" once the advertiser accepted the Customer Match terms of service",
    )  # fmt: skip

    _v_dm = field_validator("datamanager_endpoint")(classmethod(lambda cls, v: check_endpoint(v)))
    _v_ads = field_validator("google_ads_endpoint")(classmethod(lambda cls, v: check_endpoint(v)))

    @field_validator("customer_match_terms")
    @classmethod
    def _terms(cls, v: str | None) -> str | None:
        # Google refuses Customer Match data unless the terms are accepted; accepting them is the
        # advertiser's decision, so it is never a default
        if v != "accepted":
            raise ValueError(CUSTOMER_MATCH_TERMS_REQUIRED)
        return v

    @field_validator("customer_id", "login_customer_id")
    @classmethod
    def _cid(cls, v: str | None) -> str | None:
        if v is None:
            return None
        digits = v.replace("-", "")
        if not digits.isdigit():
            raise ValueError(f"expected a Google Ads customer id like '123-456-7890', got {v!r}")
        return digits


DestinationConfig = Annotated[
    MetaDestinationConfig | GoogleDestinationConfig, Field(discriminator="type")
]

# ----------------------------------------------------------------------------- workers


class WorkersConfig(_Strict):
    """Syncs as jobs on PostgreSQL (procrastinate): `serve` enqueues, `connector worker` runs them."""

    url: SecretStr = Field(description="PostgreSQL URL of the job queue, e.g. postgresql://user@host/db")
    queue: str = Field(default="connector", min_length=1, max_length=100)
    max_attempts: int = Field(default=5, ge=1, le=50, description="tries of one sync job, backing off between them")
    backoff_seconds: float = Field(default=2.0, gt=0, description="first wait before a retry; doubles each time")
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    stalled_after_seconds: float = Field(
        default=60.0, gt=0, description="a worker silent this long is dead: its job is retried elsewhere"
    )
    keep_jobs_hours: int = Field(default=72, ge=1, description="finished jobs stay in the job table this long")

    @field_validator("url")
    @classmethod
    def _postgres(cls, v: SecretStr) -> SecretStr:
        scheme = urlsplit(v.get_secret_value()).scheme.split("+")[0]
        if scheme not in ("postgresql", "postgres"):
            # never echo the URL: it may hold a password
            raise ValueError(f"expected a postgresql:// URL (scheme {scheme!r} given)")
        return v

    @model_validator(mode="after")
    def _stalled(self) -> WorkersConfig:
        if self.stalled_after_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError(
                f"stalled_after_seconds ({self.stalled_after_seconds}) must be more than twice heartbeat_seconds "
                f"({self.heartbeat_seconds}), or live workers count as dead"
            )
        return self


def check_ledger_files(value: str | None) -> str | None:
    """`ledger_files`: a local folder or an object storage URL; credentials never inside it."""
    if value is None:
        return None
    parts = urlsplit(value)
    if len(parts.scheme) > 1:  # "C:" is a drive, not a scheme
        if parts.scheme not in ("s3", "gs", "file"):
            raise ValueError(f"ledger_files: unsupported scheme {parts.scheme!r} (use s3://bucket/prefix, gs://, or a path)")
        lowered = parts.query.lower()
        if parts.password or parts.username or "secret" in lowered or "access_key" in lowered or "token" in lowered:
            raise ValueError(
                "ledger_files must not carry credentials; use the platform's usual variables "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an instance role, GOOGLE_APPLICATION_CREDENTIALS)"
            )
        if parts.scheme != "file" and not parts.netloc:
            raise ValueError(f"ledger_files: {parts.scheme}:// needs a bucket, e.g. {parts.scheme}://bucket/prefix")
    return value


# ----------------------------------------------------------------------------- top level


class ConnectorSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONNECTOR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    state_dir: Path = Field(
        default=Path(".connector"), description="ledger and sandbox files; relative to the config"
    )
    ledger_url: SecretStr | None = Field(
        default=None, description="SQLAlchemy URL of the ledger; default sqlite in state_dir"
    )
    ledger_files: str | None = Field(
        default=None,
        description="where member files live: a folder or s3://bucket/prefix (?endpoint_override=...&region=...); "
        "default state_dir/members",
    )
    workers: WorkersConfig | None = Field(
        default=None, description="jobs on PostgreSQL: `serve` enqueues, `connector worker` processes run the syncs"
    )
    max_remove_share: float = Field(default=0.20, ge=0.0, le=1.0)
    value_resend_threshold: float = Field(
        default=0.10, ge=0.0,
        description="a member's value is sent again only when it moved by more than this share of the value last sent",
    )  # fmt: skip
    log_format: Literal["text", "json"] = "text"
    webhook_secret: SecretStr | None = None
    webhook_bearer_token: SecretStr | None = None
    webhook_debounce_seconds: float = Field(
        default=1.0, ge=0.0, description="a queued sync waits this long so a burst of triggers makes one run"
    )
    timezone: str = "UTC"
    threads: int | None = Field(default=None, ge=1, le=256, description="DuckDB and DataFusion threads; default one per core")
    memory_limit: str = Field(
        default="1200MB", pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|KiB|MiB|GiB)$",
        description="DuckDB's memory limit (it spills to state_dir/tmp beyond it), e.g. '2GB'",
    )  # fmt: skip
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    sources: dict[str, SourceConfig] = Field(
        default_factory=dict, description="named sources, read once per sync for every segment naming them"
    )
    segments: dict[str, SegmentConfig] = Field(default_factory=dict)
    config_path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env overrides the file; the file arrives as init kwargs from `load_settings`.
        return (env_settings, init_settings)

    _v_ledger_files = field_validator("ledger_files")(classmethod(lambda cls, v: check_ledger_files(v)))

    @model_validator(mode="before")
    @classmethod
    def _paths_relative_to_the_config(cls, data: Any) -> Any:
        """Every relative path in the config (file or environment) is relative to the config file."""
        if not isinstance(data, dict) or data.get("config_path") is None:
            return data
        return resolve_paths(data, Path(data["config_path"]).parent)

    @field_validator("segments")
    @classmethod
    def _expand_tiers(cls, v: dict[str, SegmentConfig]) -> dict[str, SegmentConfig]:
        """A segment with `tiers` becomes one segment per tier, `NAME_TIER`, each its own audience."""
        out: dict[str, SegmentConfig] = {}
        for name, seg in v.items():
            if seg.tiers is None or seg.tier is not None:
                out[name] = seg
                continue
            for tier in seg.tiers.names:
                expanded = f"{name}_{tier}"
                if expanded in v or expanded in out:
                    raise ValueError(f"segments.{name}.tiers makes the segment {expanded!r}, which is also configured; "
                                     "rename one of them")  # fmt: skip
                out[expanded] = seg.model_copy(update={"tier": TierOf(segment=name, name=tier)})
        return out

    def segment_names(self, selection: Sequence[str] | None = None) -> list[str]:
        """Segment names to sync: all, or the given ones, a tiered segment's name standing for its tiers."""
        if not selection:
            return list(self.segments)
        names: list[str] = []
        for s in selection:
            names += [s] if s in self.segments else [n for n, seg in self.segments.items() if seg.tier and seg.tier.segment == s]
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _references(self) -> ConnectorSettings:
        for name, seg in self.segments.items():
            where = seg.tier.segment if seg.tier else name
            for used in _source_names(seg.source):
                if used not in self.sources:
                    known = ", ".join(sorted(self.sources)) or "none defined"
                    raise ValueError(f"segments.{where}.source names {used!r}, which is not a [sources.*] table (known: {known})")
            for dest in seg.destinations:
                if dest not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none defined"
                    raise ValueError(
                        f"segments.{where}.destinations names {dest!r}, which is not a "
                        f"[destinations.*] table (known: {known})"
                    )
        for name, src in self.sources.items():
            if src.clv is not None:
                if src.clv.orders not in self.sources:
                    known = ", ".join(sorted(self.sources))
                    raise ValueError(f"sources.{name}.clv.orders names {src.clv.orders!r}, which is not a [sources.*] table "
                                     f"(known: {known})")  # fmt: skip
                if self.sources[src.clv.orders].clv is not None or src.clv.orders == name:
                    raise ValueError(f"sources.{name}.clv.orders: {src.clv.orders!r} must be a plain table of orders "
                                     "(without clv)")
        for name, d in self.destinations.items():
            if isinstance(d, GoogleDestinationConfig) and d.membership_days <= d.resend_before_expiry_days:
                # every member would always be "close to expiry": each run would re-send the whole list
                raise ValueError(
                    f"destinations.{name}: membership_days ({d.membership_days}) must be larger than "
                    f"resend_before_expiry_days ({d.resend_before_expiry_days}), or every run re-sends every member"
                )
        return self

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent if self.config_path else Path.cwd()

    def resolve(self, path: Path) -> Path:
        """Relative paths in the config are relative to the config file."""
        return path if path.is_absolute() else self.base_dir / path

    @property
    def state_path(self) -> Path:
        return self.resolve(self.state_dir)

    @property
    def ledger_files_location(self) -> str | Path:
        """The member files' root: a URL (object storage) or a local folder."""
        if self.ledger_files is None:
            return self.state_path / "members"
        parts = urlsplit(self.ledger_files)
        if parts.scheme == "file":
            return Path(parts.path)
        if len(parts.scheme) > 1:
            return self.ledger_files
        return self.resolve(Path(self.ledger_files).expanduser())

    def ledger_sqlalchemy_url(self) -> str:
        if self.ledger_url is not None:
            return sqlite_url_relative_to(self.ledger_url.get_secret_value(), self.base_dir)
        return f"sqlite:///{self.state_path / 'ledger.db'}"


def _source_names(source: SourceConfig | str) -> list[str]:
    """The [sources.*] tables a segment's source reads: the named one, or the orders of an inline source's clv."""
    if isinstance(source, str):
        return [source]
    return [source.clv.orders] if source.clv is not None else []


def _absolute(value: Any, base: Path) -> Any:
    if not isinstance(value, str | Path):
        return value
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _with_path(item: Any, key: str, base: Path) -> Any:
    """`item[key]` made absolute, for a raw mapping or an already built model."""
    if isinstance(item, dict) and item.get(key) is not None:
        return {**item, key: _absolute(item[key], base)}
    if isinstance(item, BaseModel) and getattr(item, key, None) is not None:
        return item.model_copy(update={key: _absolute(getattr(item, key), base)})
    return item


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """state_dir, file sources' paths and service_account_file made absolute against `base`."""
    data = {**data, "state_dir": _absolute(data.get("state_dir", Path(".connector")), base)}
    if isinstance(data.get("destinations"), dict):
        data["destinations"] = {name: _with_path(d, "service_account_file", base) for name, d in data["destinations"].items()}
    if isinstance(data.get("sources"), dict):
        data["sources"] = {name: _with_path(src, "path", base) for name, src in data["sources"].items()}
    if isinstance(data.get("segments"), dict):
        segments = {}
        for name, seg in data["segments"].items():
            if isinstance(seg, dict) and "source" in seg:
                seg = {**seg, "source": _with_path(seg["source"], "path", base)}
            elif isinstance(seg, SegmentConfig):
                seg = seg.model_copy(update={"source": _with_path(seg.source, "path", base)})
            segments[name] = seg
        data["segments"] = segments
    return data


def sqlite_url_relative_to(url: str, base: Path) -> str:
    """A SQLite URL with a relative file path, made relative to `base` (other URLs unchanged)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url  # the ledger reports a bad URL (without printing it)
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return url
    path = Path(db).expanduser()
    if path.is_absolute():
        return url
    return parsed.set(database=str(base / path)).render_as_string(hide_password=False)


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  - {loc}: {msg}" if loc else f"  - {msg}")
    return "\n".join(lines)


def config_path_from(arg: str | Path | None) -> Path:
    return Path(arg or os.environ.get("CONNECTOR_CONFIG") or DEFAULT_CONFIG)


def load_settings(path: str | Path | None = None) -> ConnectorSettings:
    """Read the TOML file (default ./connector.toml or $CONNECTOR_CONFIG) and the environment."""
    cfg = config_path_from(path)
    if not cfg.is_file():
        raise ConfigError(f"{cfg}: config file not found (pass --config PATH or set CONNECTOR_CONFIG)")
    try:
        data = tomllib.loads(cfg.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg}: not valid TOML: {exc}") from None
    try:
        return ConnectorSettings(**data, config_path=cfg.resolve())
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(cfg, exc)) from None
