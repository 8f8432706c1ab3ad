"""What `connector validate` checks beyond the config's own shape: what a sync will need.

- credentials complete for the path each destination takes (sandboxes need none);
- every file the config names exists (and a service account file looks like one);
- each source (named or a segment's own) is reachable and has the mapped columns: only headers are read
  (a CSV header, a Parquet schema, the SQL query's columns with ``LIMIT 0``, the first page of an HTTP
  source); a segment's `where` parses as one SQL predicate over those columns and `tiers.by` is one of
  them; a source's `clv` finds its key, the orders' columns and pymc-marketing;
- settings that do nothing together (a lookalike for a platform the segment does not sync to).

Settings that cannot work together at all (``membership_days <= resend_before_expiry_days``) are
refused when the config is loaded, by every command.

A problem is a plain line naming the setting (``destinations.meta_ads.access_token: ...``); secrets,
URLs with credentials and row contents never appear in one.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from connector.clv import order_columns
from connector.errors import ConnectorError
from connector.segments import definition_problems, derived_columns
from connector.settings import (
    ClvConfig,
    ConnectorSettings,
    DestinationConfig,
    GoogleDestinationConfig,
    MetaDestinationConfig,
    SegmentConfig,
    SourceConfig,
)
from connector.sources import open_source

GOING_TO_PRODUCTION = "README 'Going to production'"


def env_var(dest: str, field: str) -> str:
    """The environment variable that sets `destinations.<dest>.<field>`."""
    return f"CONNECTOR_DESTINATIONS__{dest.upper()}__{field.upper()}"


def problems(settings: ConnectorSettings, *, sources: bool = True) -> list[str]:
    """Every problem found, in config order; empty when a sync has what it needs."""
    found: list[str] = []
    if settings.state_path.exists() and not settings.state_path.is_dir():
        found.append(f"state_dir: {settings.state_path} is a file, not a directory")
    for name, dest in settings.destinations.items():
        found += destination_problems(settings, name, dest)
    headers: dict[str, list[str] | None] = {}
    if sources:
        for name, src in settings.sources.items():
            found += named_source_problems(settings, name, src, headers)
    for name, seg in settings.segments.items():
        if seg.tier is not None:
            if seg.tiers is None or seg.tier.name != seg.tiers.names[0]:
                continue  # the tiers of one segment share its settings: checked once, under its own name
            name = seg.tier.segment
        found += segment_problems(settings, name, seg)
        if sources:
            found += source_problems(settings, name, seg, headers)
    return found


# ----------------------------------------------------------------------------- destinations


def destination_problems(settings: ConnectorSettings, name: str, dest: DestinationConfig) -> list[str]:
    if dest.sandbox:
        return []  # the bundled emulators (or the ones at the endpoints) need no account
    where = f"destinations.{name}"
    if isinstance(dest, MetaDestinationConfig):
        if dest.access_token is None:
            return [f"{where}.access_token: missing; set {env_var(name, 'access_token')} to a system user token "
                    f"with the ads_management permission (see {GOING_TO_PRODUCTION}), or use sandbox = true"]  # fmt: skip
        return []
    return _google_problems(settings, name, dest)


def _google_problems(settings: ConnectorSettings, name: str, dest: GoogleDestinationConfig) -> list[str]:
    where = f"destinations.{name}"
    found: list[str] = []
    oauth = {
        "oauth_client_id": dest.oauth_client_id is not None,
        "oauth_client_secret": dest.oauth_client_secret is not None,
        "oauth_refresh_token": dest.oauth_refresh_token is not None,
    }
    if dest.service_account_file is not None:
        found += _service_account_problems(f"{where}.service_account_file", settings.resolve(dest.service_account_file))
        if any(oauth.values()):
            set_ = ", ".join(k for k, v in oauth.items() if v)
            found.append(f"{where}: both service_account_file and {set_} are set; keep one kind of credentials")
    elif all(oauth.values()):
        pass
    elif any(oauth.values()):
        missing = [k for k, v in oauth.items() if not v]
        found.append(f"{where}: OAuth credentials need oauth_client_id, oauth_client_secret and oauth_refresh_token; "
                     f"missing {', '.join(missing)} (e.g. {env_var(name, missing[-1])})")  # fmt: skip
    else:
        found.append(f"{where}: no Google credentials: set service_account_file, or oauth_client_id + "
                     f"oauth_client_secret + oauth_refresh_token ({env_var(name, 'oauth_refresh_token')}); "
                     f"see {GOING_TO_PRODUCTION}, or use sandbox = true")  # fmt: skip
    if dest.developer_token is None:
        if dest.upload_api == "google_ads":
            found.append(f"{where}.developer_token: missing; upload_api = \"google_ads\" needs an allowlisted developer "
                         f"token ({env_var(name, 'developer_token')}), or use upload_api = \"datamanager\"")  # fmt: skip
        seeds = [s for s, seg in settings.segments.items() if seg.lookalike.google and name in seg.destinations]
        if seeds:
            found.append(f"{where}.developer_token: missing; Google lookalikes (segments {', '.join(seeds)}) are "
                         "made through the Google Ads API, which needs a developer token "
                         f"({env_var(name, 'developer_token')})")  # fmt: skip
    return found


def _service_account_problems(where: str, path: Path) -> list[str]:
    if not path.is_file():
        return [f"{where}: {path} not found"]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return [f"{where}: {path} is not a JSON key file (download one for the service account in the Cloud console)"]
    if not isinstance(doc, dict) or not doc.get("client_email") or not doc.get("private_key"):
        return [f"{where}: {path} is not a service account key (no client_email or private_key)"]
    return []


# ----------------------------------------------------------------------------- segments


def segment_problems(settings: ConnectorSettings, name: str, seg: SegmentConfig) -> list[str]:
    kinds = {settings.destinations[d].type for d in seg.destinations}
    found: list[str] = []
    for platform in ("meta", "google"):
        if getattr(seg.lookalike, platform) is not None and platform not in kinds:
            found.append(f"segments.{name}.lookalike.{platform}: the segment has no {platform} destination "
                         f"(destinations = {seg.destinations}); the lookalike would never be made")  # fmt: skip
    return found


def mapped_columns(seg: SegmentConfig) -> list[str]:
    """The source columns a sync of the segment reads, in config order."""
    consent = [c for c in (seg.consent.ad_user_data_column, seg.consent.ad_personalization_column) if c]
    return list(dict.fromkeys([*seg.identifiers.values(), *consent, *([seg.key] if seg.key else [])]))


def source_problems(settings: ConnectorSettings, name: str, seg: SegmentConfig,
                    headers: dict[str, list[str] | None] | None = None) -> list[str]:  # fmt: skip
    """The source is reachable and has the mapped columns, and `where` and `tiers` read columns it has:
    its header, schema, the query's columns or the first page's fields, never its rows. A named source's
    own problems are `named_source_problems`'s."""
    where = f"segments.{name}.source"
    headers = {} if headers is None else headers
    if isinstance(seg.source, str):
        columns = _header(settings, seg.source, headers)
        if columns is None:
            return []  # reported under sources.NAME
        what = f"sources.{seg.source}"
    else:
        try:
            source = open_source(seg.source, settings.base_dir)
            columns = derived_columns(seg.source, source.columns())
        except ConnectorError as exc:
            return [f"{where}: {exc}"]
        what = source.description
        if seg.source.clv is not None:
            found = _clv_problems(settings, where, seg.source.clv, columns[:-1], headers)
            if found:
                return found
    return [*_columns(where, what, mapped_columns(seg), columns), *definition_problems(f"segments.{name}", seg, columns)]


def named_source_problems(settings: ConnectorSettings, name: str, source: SourceConfig,
                          headers: dict[str, list[str] | None]) -> list[str]:  # fmt: skip
    """A [sources.NAME] table is reachable; its `clv` names columns that exist and can be fitted here."""
    where = f"sources.{name}"
    try:
        header = open_source(source, settings.base_dir).columns()
    except ConnectorError as exc:
        headers[name] = None
        return [f"{where}: {exc}"]
    headers[name] = derived_columns(source, header)
    if source.clv is None:
        return []
    return _clv_problems(settings, where, source.clv, header, headers)


def _header(settings: ConnectorSettings, name: str, headers: dict[str, list[str] | None]) -> list[str] | None:
    if name not in headers:
        named_source_problems(settings, name, settings.sources[name], headers)
    return headers[name]


def _clv_problems(settings: ConnectorSettings, where: str, spec: ClvConfig, header: Sequence[str],
                  headers: dict[str, list[str] | None]) -> list[str]:  # fmt: skip
    found = []
    if importlib.util.find_spec("pymc_marketing") is None:
        found.append(f"{where}.clv: predicted values need pymc-marketing: pip install 'connector[clv]'")
    if spec.key_column not in header:
        found.append(f"{where}.clv.key: the source has no column {spec.key_column!r} to match the orders' customers; "
                     f"available columns: {', '.join(header) or 'none'}")  # fmt: skip
    if spec.column in header:
        found.append(f"{where}.clv.column: the source already has a column {spec.column!r}; name the predicted value "
                     "another way")  # fmt: skip
    orders = _header(settings, spec.orders, headers)
    missing = [c for c in order_columns(spec) if orders is not None and c not in orders]
    if missing:
        found.append(f"{where}.clv: the orders (sources.{spec.orders}) have no column(s) {', '.join(map(repr, missing))} "
                     "(set clv.customer, clv.time, clv.amount); available columns: "
                     f"{', '.join(orders or []) or 'none'}")  # fmt: skip
    return found


def _columns(where: str, what: str, wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    missing = [c for c in wanted if c not in available]
    found = []
    if missing:
        found.append(f"{where}: {what} has no column(s) {', '.join(map(repr, missing))}; it has: "
                     f"{', '.join(map(repr, available)) or 'none'} (fix the segment's key, identifiers or consent "
                     "columns, or the export)")  # fmt: skip
    dupes = sorted({c for c in available if list(available).count(c) > 1} & set(wanted))
    if dupes:
        found.append(f"{where}: {what}: column(s) {', '.join(map(repr, dupes))} appear more than once")
    return found
