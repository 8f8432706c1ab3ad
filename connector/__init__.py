"""connector: mirror customer segments into Google Customer Match and Meta Custom Audiences.

Public API::

    from connector import load_settings, plan, sync
    settings = load_settings("connector.toml")
    for run in plan(settings):            # dry run: what would be sent, nothing is
        print(run.as_dict())
    results = sync(settings, ["vip_buyers"], full_refresh=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from connector.engine import Engine, RunResult, SyncOptions
from connector.settings import ConnectorSettings, load_settings

__version__ = "0.1.0"


def sync(settings: ConnectorSettings, segments: Sequence[str] | None = None, **options: Any) -> list[RunResult]:
    """Sync `segments` (default: all) to their destinations; options as `SyncOptions`."""
    with Engine(settings) as engine:
        return engine.sync(segments, SyncOptions(**options))


def plan(settings: ConnectorSettings, segments: Sequence[str] | None = None, **options: Any) -> list[RunResult]:
    """The plan of a sync (adds, removes, unchanged, invalid rows by reason); sends nothing."""
    return sync(settings, segments, **{**options, "dry_run": True})


__all__ = ["ConnectorSettings", "Engine", "RunResult", "SyncOptions", "__version__", "load_settings", "plan", "sync"]
