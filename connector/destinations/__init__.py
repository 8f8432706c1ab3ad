"""Destinations: one package per platform; `build_destination` picks by config type."""

from __future__ import annotations

from pathlib import Path

from connector.destinations.base import Destination, ValueSupport
from connector.retry import RetryStats
from connector.settings import DestinationConfig, GoogleDestinationConfig, MetaDestinationConfig


def build_destination(
    name: str, config: DestinationConfig, state_dir: Path, stats: RetryStats | None = None
) -> Destination:
    """Build the configured destination. With `sandbox = true` this starts the bundled emulator."""
    # Imports are lazy so that a config using one platform never loads the other's SDK.
    if isinstance(config, MetaDestinationConfig):
        from connector.destinations.meta.destination import MetaDestination

        return MetaDestination.from_config(name, config, state_dir, stats=stats)
    if isinstance(config, GoogleDestinationConfig):
        from connector.destinations.google.destination import GoogleDestination

        return GoogleDestination.from_config(name, config, state_dir, stats=stats)
    raise TypeError(f"unknown destination config {type(config).__name__}")


# Google Ads `UserAttribute.lifetime_value_micros` is an int64 of micros (google-ads v26
# common/types/offline_user_data.py): the largest value it carries is (2**63 - 1) / 10**6.
GOOGLE_ADS_MAX_VALUE = (2**63 - 1) / 1_000_000


def value_support(config: DestinationConfig) -> ValueSupport:
    """What a destination does with members' values, from its configuration alone (a dry run builds no
    destination). Meta: a value-based audience takes `LOOKALIKE_VALUE`, "an integer or floating-point
    arbitrary non-negative number" for every member (Marketing API, value-based lookalike audiences), so a
    member without one is not sent. Google Ads API: `lifetime_value_micros` is an optional attribute of a
    member. Data Manager: audience members have no value field."""
    if isinstance(config, MetaDestinationConfig):
        return ValueSupport("required", None, "LOOKALIKE_VALUE")
    if config.upload_api == "google_ads":
        return ValueSupport("optional", GOOGLE_ADS_MAX_VALUE, "lifetime_value_micros")
    return ValueSupport("none")
