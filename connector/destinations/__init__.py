"""Destinations: one package per platform; `build_destination` picks by config type."""

from __future__ import annotations

from pathlib import Path

from connector.destinations.base import Destination
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
