"""Shared fixtures: a segment CSV that tests rewrite between runs, settings pointing at it, and
in-memory destinations that survive across engine instances (like a real platform would)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.destinations.memory import InMemoryDestination
from connector.engine import Engine, RunResult, SyncOptions
from connector.settings import ConnectorSettings, load_settings

IDENTIFIERS = (
    '{ email = "email", phone = "phone", first_name = "first_name", last_name = "last_name", '
    'zip = "zip", country = "country" }'
)
FIELDS = ["customer_id", "email", "phone", "first_name", "last_name", "zip", "country", "consent"]


def read_source(src: Any, columns: list[str]) -> dict[str, list[str | None]]:
    """A source's columns as Python lists, read through its DuckDB relation (errors as the engine sees them)."""
    import duckdb

    from connector.sources import reading

    con = duckdb.connect()
    try:
        with reading(src):
            table = src.relation(con, columns).to_arrow_table()
    finally:
        con.close()
    return {c: table.column(c).to_pylist() for c in ["__row", *columns]}


def person(i: int, **over: str) -> dict[str, str]:
    row = {
        "customer_id": f"C{i}",
        "email": f"user{i}@example.com",
        "phone": f"+1415555{i % 10000:04d}",
        "first_name": "Mary",
        "last_name": "Smith",
        "zip": "94107",
        "country": "US",
        "consent": "granted",
    }
    row.update(over)
    return row


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


class Harness:
    """A config on disk with one CSV segment and two in-memory destinations (meta, google)."""

    def __init__(self, tmp: Path, **segment_extra: Any) -> None:
        self.dir = tmp
        self.csv = tmp / "members.csv"
        write_csv(self.csv, [])
        self.destinations: dict[str, InMemoryDestination] = {
            "meta": InMemoryDestination("meta", "meta"),
            "google": InMemoryDestination("google", "google"),
        }
        extra = "".join(f"{k} = {v}\n" for k, v in segment_extra.items())
        (tmp / "connector.toml").write_text(
            f"""
state_dir = "state"

[destinations.meta]
type = "meta"
ad_account_id = "act_1"
sandbox = true

[destinations.google]
type = "google"
customer_id = "1234567890"
customer_match_terms = "accepted"
sandbox = true

[segments.vip]
source = {{ type = "csv", path = "members.csv" }}
key = "customer_id"
identifiers = {IDENTIFIERS}
consent = {{ ad_user_data_column = "consent" }}
destinations = ["meta", "google"]
{extra}
""",
            encoding="utf-8",
        )

    @property
    def settings(self) -> ConnectorSettings:
        return load_settings(self.dir / "connector.toml")

    def factory(self, name: str, _cfg: Any, _state: Path, stats: Any) -> InMemoryDestination:
        dest = self.destinations[name]
        dest.stats = stats
        return dest

    def engine(self) -> Engine:
        return Engine(self.settings, destination_factory=self.factory)

    def sync(self, rows: list[dict[str, str]] | None = None, **opts: Any) -> dict[str, RunResult]:
        if rows is not None:
            write_csv(self.csv, rows)
        with self.engine() as engine:
            return {r.destination: r for r in engine.sync(None, SyncOptions(**opts))}

    def audience(self, dest: str) -> set[frozenset[tuple[str, str]]]:
        d = self.destinations[dest]
        assert len(d.audiences) == 1, d.audiences
        return d.members(next(iter(d.audiences)))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield Harness(tmp_path)


@pytest.fixture
def make_harness(tmp_path: Path) -> Callable[..., Harness]:
    def make(**extra: Any) -> Harness:
        return Harness(tmp_path, **extra)

    return make


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The chaos suite's summary line (scenarios, faults injected, kills, mismatches), when it ran."""
    scenario = sys.modules.get("scenario")  # tests/chaos/scenario.py, imported by tests/chaos/test_chaos.py
    outcomes = getattr(scenario, "OUTCOMES", None)
    if outcomes:
        terminalreporter.write_line(scenario.summary(outcomes))  # type: ignore[union-attr]
