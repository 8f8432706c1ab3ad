"""connector: mirror customer segments into Google Customer Match and Meta Custom Audiences.

Public API::

    from connector import load_settings, plan, sync
    settings = load_settings("connector.toml")
    for run in plan(settings):            # dry run: what would be sent, nothing is
        print(run.as_dict())
    results = sync(settings, ["vip_buyers"], full_refresh=False)
"""

from __future__ import annotations

import os

# Before Arrow and DataFusion load: no transparent huge pages for this process. Their allocator (mimalloc)
# hands freed memory back to the kernel within milliseconds; with huge pages the kernel then zeroes a whole
# 2 MB page each time a batch touches a little of it again: a quarter of a cold sync's CPU time on a 2-core
# virtual machine (docs/configuration.md, "Memory"). With this set, mimalloc turns them off for the process
# (prctl PR_SET_THP_DISABLE, which what it starts inherits). MIMALLOC_ALLOW_THP=1 keeps them; a program that
# loaded pyarrow before importing connector keeps what it had.
os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")

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
