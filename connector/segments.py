"""A segment's rows: its source, read once per sync, narrowed by `where` or cut into value tiers.

A named source (``[sources.NAME]``) and an inline source that needs more than one scan (a `where`,
`tiers` or `clv`) are read whole, once per `Engine.sync` call, into a table of the sync's DuckDB database
(text columns, as every source hands them, plus the predicted-value column of a source with `clv`).
Every segment of the call that uses the source gets a relation over that table:

- ``where``: a SQL predicate evaluated by DuckDB over the source's columns, typed from their text: a
  column whose every value is an integer is BIGINT (unless one has a leading zero, like a zip code), a
  number DOUBLE, ``true``/``false`` BOOLEAN, an ISO date DATE, an ISO timestamp TIMESTAMP, anything else
  text; a column without any value takes any type. The members keep their text values.
- ``tiers``: the rows (those matching `where`, if any) ranked by the `by` column, descending (largest
  first; ``ascending = true`` reverses it), ties broken by the segment's `key` and then the source's row
  order; tier i holds the ranks up to ``ceil(n * share_i)`` of the ``n`` rows with a value, and the last
  tier also every row whose value is missing, not a number or not finite. Each member row carries its
  tier's name in the column ``_tier``.

A plain inline source keeps the streaming path: its relation is planned directly (a file) or kept as
a table for the plan's second scan (query results, HTTP pages).

`predicate_columns` parses a predicate without reading rows, so `connector validate` can check it
against a source's header.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import duckdb

from connector.clv import ClvSummary, order_columns, predict
from connector.errors import ConfigError, ConnectorError, SourceError
from connector.settings import (
    TIER_COLUMN,
    ConnectorSettings,
    CsvSource,
    ParquetSource,
    SegmentConfig,
    SourceConfig,
)
from connector.sources import open_source, reading
from connector.sources.base import ROW, ident, literal

log = logging.getLogger("connector.segments")

_PLACEHOLDER = "__connector_where"
# text -> type, in the order tried; the leading-zero test keeps ids and zip codes ("02134") text
_TYPES = ("BIGINT", "DOUBLE", "BOOLEAN", "DATE", "TIMESTAMP")
_LEADING_ZERO = r"^\s*[-+]?0[0-9]"


# ----------------------------------------------------------------------------- predicates


def predicate_columns(predicate: str) -> list[str]:
    """The column names a `where` predicate reads, in order. ValueError (the reason) when it is not one
    SQL predicate: a syntax error, several statements, or text that closes the predicate early."""
    sql = f"SELECT * FROM {_PLACEHOLDER} WHERE ({predicate}\n)"
    con = duckdb.connect()
    try:
        doc = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    finally:
        con.close()
    if doc.get("error"):
        raise ValueError(f"not a SQL predicate: {doc.get('error_message', 'syntax error')}")
    statements = doc.get("statements") or []
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    source = node.get("from_table") or {}
    if (node.get("type") != "SELECT_NODE" or source.get("table_name") != _PLACEHOLDER or node.get("modifiers")
            or node.get("group_expressions") or node.get("having") or node.get("qualify")):  # fmt: skip
        raise ValueError("not a single SQL predicate (it closes the condition and adds a query part)")
    refs: list[str] = []
    _column_refs(node.get("where_clause"), refs, set())
    return list(dict.fromkeys(refs))


def _column_refs(node: Any, out: list[str], bound: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _column_refs(item, out, bound)
        return
    if not isinstance(node, dict):
        return
    if node.get("class") == "LAMBDA":
        # a lambda's parameters (x -> x > 1) are not columns
        params: list[str] = []
        _column_refs(node.get("lhs"), params, set())
        _column_refs(node.get("expr"), out, bound | set(params))
        return
    if node.get("class") == "COLUMN_REF":
        names = node.get("column_names") or []
        if names and names[-1] not in bound:
            out.append(str(names[-1]))
        return
    for value in node.values():
        _column_refs(value, out, bound)


def definition_problems(where: str, seg: SegmentConfig, columns: Sequence[str]) -> list[str]:
    """Problems of a segment's `where` and `tiers` against the columns its source will have; `where` is
    the setting's path (``segments.NAME``)."""
    found: list[str] = []
    available = f"available columns: {', '.join(columns) or 'none'}"
    if seg.where is not None:
        try:
            refs = predicate_columns(seg.where)
        except ValueError as exc:
            found.append(f"{where}.where: {exc}; {available}")
        else:
            missing = [c for c in refs if c not in columns]
            if missing:
                found.append(f"{where}.where names column(s) {', '.join(map(repr, missing))} the source does not have; "
                             f"{available}")  # fmt: skip
    if seg.tiers is not None:
        if seg.tiers.by not in columns:
            found.append(f"{where}.tiers.by: the source has no column {seg.tiers.by!r}; {available}")
        if TIER_COLUMN in columns:
            found.append(f"{where}.tiers: the source has a column {TIER_COLUMN!r}, which tiers add; rename it in the source")
    return found


def derived_columns(source: SourceConfig, header: Sequence[str]) -> list[str]:
    """A source's columns as segments see them: its own, then the predicted-value column of `clv`."""
    return [*header, source.clv.column] if source.clv is not None else list(header)


# ----------------------------------------------------------------------------- the sync's tables


@dataclass(slots=True)
class SourceTable:
    """A source read into the sync's database."""

    label: str  # the setting that defines it: sources.NAME or segments.NAME.source
    table: str  # its qualified name
    columns: list[str]
    clv_column: str | None = None
    clv: ClvSummary | None = None
    clv_error: ConnectorError | None = None  # the fit failed: segments reading clv_column stop with this
    types: dict[str, str] = field(default_factory=dict)  # column -> DuckDB type, inferred when first needed
    ranks: dict[str, str] = field(default_factory=dict)  # tiering -> table of (__row, _tier)


@dataclass(slots=True)
class SegmentRows:
    """What `SegmentSources.rows` hands the planner: a relation name and what it took to make it."""

    name: str
    clv: ClvSummary | None = None
    tier: dict[str, Any] | None = None
    seconds: float = 0.0  # reading, fitting, filtering (the first segment of a source pays the reading)


class SegmentSources:
    """The sources of one sync call, each read at most once, in one DuckDB database (`db`); segments
    are planned on cursors of it (their temporary tables stay their own)."""

    def __init__(self, settings: ConnectorSettings, db: duckdb.DuckDBPyConnection) -> None:
        self.settings = settings
        self.db = db
        self._tables: dict[str, SourceTable] = {}
        self._n = 0
        db.execute("CREATE SCHEMA IF NOT EXISTS sources")

    def close(self) -> None:
        self.db.close()

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    # ------------------------------------------------------------------ reading a source once

    def table(self, source: SourceConfig | str, label: str) -> SourceTable:
        """The source read into a table, once per sync: a named source by its name, a segment's own by
        the segment (`label`: the tiers of one segment share it)."""
        if isinstance(source, str):
            cache, label, config = source, f"sources.{source}", self.settings.sources[source]
        else:
            cache, config = label, source
        if cache not in self._tables:
            self._tables[cache] = self._read(config, label)
        return self._tables[cache]

    def _read(self, config: SourceConfig, label: str) -> SourceTable:
        name = f"sources.{self._name('t')}"
        src = open_source(config, self.settings.base_dir)
        header = src.columns()
        dupes = sorted({c for c in header if header.count(c) > 1})
        if dupes:
            raise SourceError(f"{label}: column(s) {', '.join(map(repr, dupes))} appear more than once; a source read "
                              "whole needs unique column names")  # fmt: skip
        if config.clv is not None and config.clv.column in header:
            raise ConfigError(f"{label}.clv.column: the source already has a column {config.clv.column!r}; "
                              "set clv.column to another name")  # fmt: skip
        with reading(src):
            rel = src.relation(self.db, header)
            rel.create(f"{name}_raw" if config.clv is not None else name)
        tab = SourceTable(label, name, derived_columns(config, header))
        if config.clv is not None:
            tab.clv_column = config.clv.column
            self._add_clv(tab, config, header, label)
        return tab

    def _add_clv(self, tab: SourceTable, config: SourceConfig, header: list[str], label: str) -> None:
        spec = config.clv
        assert spec is not None and tab.clv_column is not None
        values: str | None = None
        if spec.key_column not in header:
            tab.clv_error = ConfigError(f"{label}.clv.key: the source has no column {spec.key_column!r} to match the "
                                        f"orders' customers; available columns: {', '.join(header)}")  # fmt: skip
        else:
            try:
                orders = self.table(spec.orders, f"sources.{spec.orders}")
                missing = [c for c in order_columns(spec) if c not in orders.columns]
                if missing:
                    raise ConfigError(f"{label}.clv: the orders ({orders.label}) have no column(s) "
                                      f"{', '.join(map(repr, missing))}; available columns: "
                                      f"{', '.join(orders.columns)}")  # fmt: skip
                predicted, tab.clv = predict(self.db, orders.table, spec, source=label.removeprefix("sources."),
                                             cache=self.settings.state_path / "clv")
                values = self._name("clv")
                self.db.register(values, predicted)
            except ConnectorError as exc:
                tab.clv_error = exc
                log.warning("%s (only the segments that read %s stop)", exc, tab.clv_column)
        cols = ", ".join(f"s.{ident(c)}" for c in header)
        if values is None:
            value = "NULL::VARCHAR"
        else:
            value = "CAST(v.value AS VARCHAR)"
        join = "" if values is None else f"LEFT JOIN {values} AS v ON v.customer_id = s.{ident(spec.key_column)}"
        self.db.execute(f"CREATE TABLE {tab.table} AS SELECT s.{ROW}, {cols}, {value} AS {ident(tab.clv_column)} "
                        f"FROM {tab.table}_raw AS s {join}")  # fmt: skip
        self.db.execute(f"DROP TABLE {tab.table}_raw")
        if values is not None:
            self.db.unregister(values)
            assert tab.clv is not None
            tab.clv.matched_customers = int(
                self.db.execute(f"SELECT count({ident(tab.clv_column)}) FROM {tab.table}").fetchall()[0][0])
        tab.types[tab.clv_column] = "DOUBLE"

    # ------------------------------------------------------------------ a segment's rows

    @contextmanager
    def rows(self, con: duckdb.DuckDBPyConnection, segment: str, seg: SegmentConfig,
             columns: Sequence[str]) -> Iterator[SegmentRows]:  # fmt: skip
        """A relation in `con` with ``__row`` and `columns` (text) of the segment's members, plus ``_tier``
        for a tier; gone when the block ends."""
        if not isinstance(seg.source, str) and seg.where is None and seg.tiers is None and seg.source.clv is None:
            with self._streamed(con, seg.source, columns) as name:
                yield SegmentRows(name)
            return
        t0 = time.monotonic()
        where = f"segments.{seg.tier.segment if seg.tier else segment}"
        tab = self.table(seg.source, f"{where}.source")
        refs = self._check(where, seg, tab, columns)
        if tab.clv_error is not None and tab.clv_column in refs:
            raise tab.clv_error
        view, picked = self._name("seg"), None
        out = [f"t.{ROW}", *(f"t.{ident(c)}" for c in columns)]
        tier_info: dict[str, Any] | None = None
        if seg.tiers is not None:
            assert seg.tier is not None
            ranks = self._ranks(where, seg, tab)
            tier_info = {"name": seg.tier.name, "by": seg.tiers.by, **self._tier_counts(ranks, seg.tier.name)}
            sql = (f"SELECT {', '.join(out)}, r.{TIER_COLUMN} FROM {tab.table} AS t JOIN {ranks} AS r USING ({ROW}) "
                   f"WHERE r.{TIER_COLUMN} = {literal(seg.tier.name)}")  # fmt: skip
        elif seg.where is not None:
            picked = self._name("picked")
            self._evaluate(con, where, f"CREATE TEMP TABLE {picked} AS SELECT {ROW} FROM ({self._typed(tab, refs)}) "
                                      f"WHERE ({seg.where}\n)", tab)  # fmt: skip
            sql = f"SELECT {', '.join(out)} FROM {tab.table} AS t SEMI JOIN {picked} USING ({ROW})"
        else:
            sql = f"SELECT {', '.join(out)} FROM {tab.table} AS t"
        con.execute(f"CREATE TEMP VIEW {view} AS {sql}")
        try:
            yield SegmentRows(view, tab.clv, tier_info, time.monotonic() - t0)
        finally:
            con.execute(f"DROP VIEW IF EXISTS {view}")
            if picked:
                con.execute(f"DROP TABLE IF EXISTS {picked}")

    @contextmanager
    def _streamed(self, con: duckdb.DuckDBPyConnection, config: SourceConfig, columns: Sequence[str]) -> Iterator[str]:
        source = open_source(config, self.settings.base_dir)
        name = self._name("src")
        file = isinstance(config, CsvSource | ParquetSource)
        with reading(source):
            rel = source.relation(con, columns)
            if file:
                rel.create_view(name)
            else:  # a one-shot stream (query results, pages): kept, since a plan may read it twice
                rel.create(name)
            try:
                yield name
            finally:
                con.execute(f"DROP VIEW IF EXISTS {name}" if file else f"DROP TABLE IF EXISTS {name}")

    def _check(self, where: str, seg: SegmentConfig, tab: SourceTable, columns: Sequence[str]) -> set[str]:
        """The columns the segment reads; ConfigError for a bad predicate or a missing column."""
        problems = definition_problems(where, seg, tab.columns)
        missing = [c for c in columns if c not in tab.columns]
        if missing:
            problems.append(f"{where}: the source ({tab.label}) has no column(s) {', '.join(map(repr, missing))}; "
                            f"available columns: {', '.join(tab.columns)}")  # fmt: skip
        if problems:
            raise ConfigError("; ".join(problems))
        refs = set(columns)
        if seg.where is not None:
            refs |= set(predicate_columns(seg.where))
        if seg.tiers is not None:
            refs.add(seg.tiers.by)
        return refs

    def _types(self, tab: SourceTable, columns: Sequence[str]) -> dict[str, str]:
        """Each column's type, inferred from its text in one scan (see the module's docstring)."""
        todo = [c for c in dict.fromkeys(columns) if c not in tab.types]
        if todo:
            aggs = []
            for c in todo:
                q = ident(c)
                aggs += [f"count({q})", *(f"count(TRY_CAST({q} AS {t}))" for t in _TYPES),
                         f"coalesce(bool_or(regexp_matches({q}, {literal(_LEADING_ZERO)})), false)"]  # fmt: skip
            row = self.db.execute(f"SELECT {', '.join(aggs)} FROM {tab.table}").fetchall()[0]
            width = len(_TYPES) + 2
            for i, c in enumerate(todo):
                n, *casts, leading_zero = row[i * width:(i + 1) * width]
                typ = "NULL" if n == 0 else "VARCHAR"
                for t, ok in zip(_TYPES, casts, strict=True):
                    if n and ok == n and not (leading_zero and t in ("BIGINT", "DOUBLE")):
                        typ = t
                        break
                tab.types[c] = typ
        return {c: tab.types[c] for c in columns}

    def _typed(self, tab: SourceTable, refs: set[str]) -> str:
        """SQL of the source's rows with the columns in `refs` typed (see `_types`)."""
        cols = [c for c in tab.columns if c in refs]
        types = self._types(tab, cols)
        exprs = []
        for c in cols:
            t = types[c]
            q = ident(c)
            exprs.append(f"NULL AS {q}" if t == "NULL" else q if t == "VARCHAR" else f"TRY_CAST({q} AS {t}) AS {q}")
        return f"SELECT {', '.join([ROW, *exprs])} FROM {tab.table}"

    def _evaluate(self, con: duckdb.DuckDBPyConnection, where: str, sql: str, tab: SourceTable) -> None:
        """Run SQL that evaluates a segment's predicate: DuckDB's parse and bind errors are the config's
        (they name columns and types, never values); an error while reading rows is only named."""
        try:
            con.execute(sql)
        except (duckdb.ParserException, duckdb.BinderException) as exc:
            detail = str(exc).strip().split("\n", 1)[0][:300]
            cols = ", ".join(f"{c} ({t.lower()})" for c, t in self._types(tab, tab.columns).items())
            raise ConfigError(f"{where}.where: {detail}; columns (type as read): {cols}") from None
        except duckdb.Error as exc:
            # a conversion error quotes the value: not repeated here
            raise ConfigError(f"{where}.where failed on the source's rows ({type(exc).__name__}); cast with TRY_CAST "
                              "where a value may not convert") from None  # fmt: skip

    def _ranks(self, where: str, seg: SegmentConfig, tab: SourceTable) -> str:
        """The table of (__row, _tier) of a tiered segment, computed once per sync."""
        tiers = seg.tiers
        assert tiers is not None
        spec = json.dumps([seg.where, tiers.model_dump(), seg.key], sort_keys=True)
        cache = hashlib.sha256(spec.encode()).hexdigest()
        if cache in tab.ranks:
            return tab.ranks[cache]
        refs = {tiers.by, *([seg.key] if seg.key else [])}
        if seg.where is not None:
            refs |= set(predicate_columns(seg.where))
        typed = self._typed(tab, refs)
        by_type = self._types(tab, [tiers.by])[tiers.by]
        by = ident(tiers.by)
        if by_type in ("DATE", "TIMESTAMP", "BIGINT", "DOUBLE"):
            value = by if by_type in ("DATE", "TIMESTAMP") else f"CASE WHEN isfinite({by}::DOUBLE) THEN {by}::DOUBLE END"
        else:  # text (some values are not numbers) or no value at all: the numbers rank, the rest go last
            value = f"CASE WHEN isfinite(TRY_CAST({by} AS DOUBLE)) THEN TRY_CAST({by} AS DOUBLE) END"
        order = "ASC" if tiers.ascending else "DESC"
        filt = f"WHERE ({seg.where}\n)" if seg.where is not None else ""
        key = ident(seg.key) if seg.key else "NULL"
        names = tiers.names
        cases = []
        for name, share in list(tiers.shares.items())[:-1]:
            f = Fraction(str(share))  # exact: 0.3 * 10 is 3, not 3.0000000000000004
            cases.append(f"WHEN rn <= (n * {f.numerator} + {f.denominator - 1}) // {f.denominator} THEN {literal(name)}")
        case = f"CASE WHEN v IS NULL THEN {literal(names[-1])} {' '.join(cases)} ELSE {literal(names[-1])} END"
        table = f"sources.{self._name('ranks')}"
        # ties are ordered by the key, then by the source's order: the same rows make the same tiers every run
        sql = f"""CREATE TABLE {table} AS SELECT {ROW}, {case} AS {TIER_COLUMN}, v IS NULL AS unranked FROM (
            SELECT {ROW}, v, row_number() OVER (ORDER BY v {order} NULLS LAST, k ASC NULLS LAST, {ROW}) AS rn,
                   count(v) OVER () AS n
            FROM (SELECT {ROW}, {value} AS v, {key} AS k FROM ({typed}) {filt}))"""
        self._evaluate(self.db, where, sql, tab)
        tab.ranks[cache] = table
        return table

    def _tier_counts(self, ranks: str, name: str) -> dict[str, int]:
        members, rows, unranked = self.db.execute(
            f"SELECT count(*) FILTER (WHERE {TIER_COLUMN} = {literal(name)}), count(*), count(*) FILTER (WHERE unranked) "
            f"FROM {ranks}").fetchall()[0]  # fmt: skip
        return {"members": int(members), "of_rows": int(rows), "rows_without_value": int(unranked)}


def source_header(settings: ConnectorSettings, source: SourceConfig) -> list[str]:
    """A source's columns as segments see them, from its header only (for `connector validate`)."""
    return derived_columns(source, open_source(source, settings.base_dir).columns())

