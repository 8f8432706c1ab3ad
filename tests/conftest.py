"""Shared fixtures: a segment CSV that tests rewrite between runs, settings pointing at it, and
in-memory destinations that survive across engine instances (like a real platform would)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.destinations.memory import InMemoryDestination
from connector.engine import Engine, RunResult, SyncOptions
from connector.identifiers.hashing import sha256_hex
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


# ----------------------------------------------------------------------------- a shop with named sources

SHOP_HEAD = """
state_dir = "state"

[destinations.meta]
type = "meta"
ad_account_id = "act_1"
sandbox = true

[sources.customers]
type = "csv"
path = "customers.csv"
"""


def segment(name: str, where: str | None = None, tiers: str | None = None) -> str:
    """A segment over the customers; `tiers` is TOML (an inline table)."""
    extra = (f"where = {json.dumps(where)}\n" if where else "") + (f"tiers = {tiers}\n" if tiers else "")
    return (f'\n[segments.{name}]\nsource = "customers"\nkey = "customer_id"\nidentifiers = {{ email = "email" }}\n'
            f'destinations = ["meta"]\n{extra}')


class Shop:
    """A config with a named customer source (a CSV) and an in-memory Meta destination."""

    def __init__(self, tmp: Path, config: str) -> None:
        self.dir = tmp
        self.meta = InMemoryDestination("meta", "meta")
        (tmp / "connector.toml").write_text(SHOP_HEAD + config, encoding="utf-8")

    def write(self, rows: list[dict[str, Any]], name: str = "customers.csv") -> None:
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["customer_id", "email"]
        with (self.dir / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    @property
    def settings(self) -> ConnectorSettings:
        return load_settings(self.dir / "connector.toml")

    def sync(self, segments: list[str] | None = None) -> dict[str, RunResult]:
        def factory(name: str, _cfg: Any, _state: Path, stats: Any) -> InMemoryDestination:
            self.meta.stats = stats
            return self.meta

        with Engine(self.settings, destination_factory=factory) as engine:
            return {r.segment: r for r in engine.sync(segments, SyncOptions(force=True))}

    def members(self, segment: str) -> set[int]:
        """The customers (numbers) in the segment's audience, found back from their hashed emails."""
        (aud,) = [a for a in self.meta.audiences.values() if a.name == f"connector: {segment}"]
        emails = {sha256_hex(f"user{i}@example.com"): i for i in range(1000)}
        return {emails[v] for row in aud.rows for k, v in row if k == "EMAIL"}


def customers(count: int, **columns: Callable[[int], Any]) -> list[dict[str, Any]]:
    return [{"customer_id": f"C{i:03d}", "email": f"user{i}@example.com", **{k: f(i) for k, f in columns.items()}}
            for i in range(count)]


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
