"""A pair's members as they stand now: its files resolved against the journal.

A row a run sent (`st` = SENT) is on the platform once its batch (run, b) was acknowledged, and
"maybe" on the platform when it was not: the run died with that batch in flight, or Google said
its request FAILED. Nothing else decides it, so recovery after a crash is reading the pair again:
maybe-members still in the segment are sent again, maybe-members who left are removed, and owed
removals whose batch was not acknowledged are owed still. Adds and removals are idempotent on
both platforms: at most the batch in flight is sent twice.

`compact` folds the delta into a new base with every settled state written out, so the journal's
batches of those runs can go.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from connector.identifiers.columns import CLEAR_KEYS
from connector.ledger.files import (
    MAYBE,
    MEMBER,
    ON,
    OWED,
    REJECTED,
    REPLACED,
    SENT,
    TO_SEND,
    PairFiles,
    copy_to,
    member_schema,
    read_columns,
    replaces_by_position,
    sql_path,
)
from connector.ledger.journal import Journal, PairPointer


def current_sql(files: PairFiles, pointer: PairPointer, schema: pa.Schema, positions: bool = False) -> str | None:
    """The pair's rows (members and owed removals) from base and delta, or None when it has none.
    `positions`: each row also has `pos`, a base row's row number (NULL for the delta's rows)."""
    base = files.path(pointer.base) if pointer.base else None
    delta = files.path(pointer.delta) if pointer.delta else None
    if base is None and delta is None:
        return None
    parts = []
    if base is not None:
        cols = read_columns(base, schema) + (", file_row_number AS pos" if positions else "")
        rows = f"read_parquet({sql_path(base)}{', file_row_number = true' if positions else ''})"
        b = f"SELECT {cols} FROM {rows}"
        if delta is not None and replaces_by_position(delta):
            # the base rows the delta replaces, by row number: an anti join on integers, the keys not read
            b = (f"SELECT {cols} FROM read_parquet({sql_path(base)}, file_row_number = true) AS base_rows ANTI JOIN "
                 f"(SELECT b AS pos FROM read_parquet({sql_path(delta)}) WHERE kind = {REPLACED}) AS replaced "
                 f"ON base_rows.file_row_number = replaced.pos")  # fmt: skip
        elif delta is not None:
            b = f"SELECT * FROM ({b}) AS base_rows WHERE k NOT IN (SELECT k FROM read_parquet({sql_path(delta)}))"
        parts.append(b)
    if delta is not None:
        pos = ", NULL::BIGINT AS pos" if positions else ""
        parts.append(f"SELECT {read_columns(delta, schema)}{pos} FROM read_parquet({sql_path(delta)}) "
                     f"WHERE kind IN ({MEMBER}, {OWED})")  # fmt: skip
    return " UNION ALL ".join(parts)


def register_journal(con: duckdb.DuckDBPyConnection, journal: Journal, segment: str, destination: str,
                     tag: str) -> tuple[str, str]:  # fmt: skip
    """Register the pair's acknowledged batches and rejections as DuckDB views; returns their names (the
    rejections' is "" when the platform refused no member: resolving then reads no member key)."""
    acks, rej = f"acks_{tag}", f"rej_{tag}"
    con.register(acks, journal.acks(segment, destination))
    rejections = journal.rejections(segment, destination)
    if not rejections.num_rows:
        return acks, ""
    con.register(rej, rejections)
    return acks, rej


def resolved_sql(current: str, acks: str, rej: str) -> str:
    """`current` with each sent row's state settled: st becomes ON, REJECTED, MAYBE (members) or, for
    owed removals, ON (done) / TO_SEND (owed still); `acc` is when the platform accepted it; `pending`:
    Google has not confirmed its request yet. `rej` "": no rejections."""
    if rej:
        owed_done = "a.ok AND coalesce(NOT rj.deferred, true)"
        refused = f"WHEN rj.k IS NOT NULL AND rj.deferred THEN {TO_SEND} WHEN rj.k IS NOT NULL THEN {REJECTED}"
        join = f"LEFT JOIN {rej} AS rj ON cur.st = {SENT} AND rj.k = cur.k AND rj.run = cur.run"
    else:
        owed_done, refused, join = "a.ok", "", ""
    return f"""
    SELECT cur.* EXCLUDE (st, acc),
      CASE WHEN cur.st <> {SENT} THEN cur.st
           WHEN cur.kind = {OWED} THEN CASE WHEN {owed_done} THEN {ON} ELSE {TO_SEND} END
           {refused}
           WHEN a.ok THEN {ON}
           ELSE {MAYBE} END::UTINYINT AS st,
      CASE WHEN cur.st = {SENT} THEN a.acked_at ELSE cur.acc END AS acc,
      coalesce(cur.st = {SENT} AND a.pending, false) AS pending
    FROM ({current}) AS cur
    LEFT JOIN {acks} AS a ON cur.st = {SENT} AND a.run = cur.run AND a.b = cur.b
    {join}
    """


# a member's state as `status` counts it; `state_class` gives a resolved row's index in this tuple
STATES = ("confirmed", "accepted", "rejected", "planned")
CONFIRMED, ACCEPTED, REJECTED_STATE, PLANNED = range(len(STATES))


def state_class(st: str = "st", pending: str = "pending") -> str:
    """SQL: the index in STATES of a resolved member row (accepted: Google has not confirmed its request)."""
    return (f"(CASE WHEN {st} = {ON} THEN (CASE WHEN {pending} THEN {ACCEPTED} ELSE {CONFIRMED} END) "
            f"WHEN {st} = {REJECTED} THEN {REJECTED_STATE} ELSE {PLANNED} END)::UTINYINT")  # fmt: skip


def state_histogram(con: duckdb.DuckDBPyConnection, resolved: str) -> list[int]:
    """How many members are in each of STATES (owed removals are not members)."""
    out = [0] * len(STATES)
    for cls, n in con.sql(f"SELECT {state_class()}, count(*) FROM ({resolved}) WHERE kind = {MEMBER} GROUP BY ALL").fetchall():
        out[int(cls)] += int(n)
    return out


def state_names(histogram: Sequence[int]) -> dict[str, int]:
    """A histogram over STATES as `status` shows it (states nobody is in are left out)."""
    return {name: int(n) for name, n in zip(STATES, histogram, strict=True) if n}


def state_counts(con: duckdb.DuckDBPyConnection, resolved: str) -> dict[str, int]:
    """Members by state, as `status` shows them."""
    return state_names(state_histogram(con, resolved))


def compact(con: duckdb.DuckDBPyConnection, files: PairFiles, pointer: PairPointer, payload_keys: Sequence[str],
            resolved: str, name: str) -> Path:  # fmt: skip
    """Write the pair's whole state as one base: settled states written out, owed removals that are done
    dropped. Rows whose Google request is still pending keep their (run, b) so a FAILED status can still
    send them again."""
    schema = member_schema(payload_keys)
    cols = ", ".join(f'"{f.name}"' for f in schema if f.name not in ("st", "run", "b", "acc"))
    copy_to(con, files, name, f"""
        SELECT {cols},
          (CASE WHEN pending THEN {SENT} ELSE st END)::UTINYINT AS st,
          CASE WHEN pending OR st = {MAYBE} THEN run END AS run, CASE WHEN pending THEN b END AS b, acc
        FROM ({resolved}) WHERE NOT (kind = {OWED} AND st = {ON})""")
    path = files.path(name)
    return path



COMPACT_SHARE = 0.2  # a delta past this share of its base is folded into a new base


def settle(con: duckdb.DuckDBPyConnection, journal: Journal, segment: str, destination: str, files: PairFiles,
           pointer: PairPointer, payload_keys: Sequence[str], run_id: int,
           planned: tuple[Sequence[int], pa.Table] | None) -> PairPointer:  # fmt: skip
    """After a run sent its file: fold a large delta into a new base, drop files nothing references, record
    the members by state. `planned`: the members the run's file left as they were, by state, and the member
    rows it wrote (k, kind, st, run, b, acc), which this run's acknowledgements settle: the counts without
    reading the pair again. Returns the pair's pointer."""
    schema = member_schema(payload_keys)
    current = current_sql(files, pointer, schema)
    if current is None:
        journal.set_counts(segment, destination, {})
        return pointer
    tag = f"s{run_id}"
    acks, rej = register_journal(con, journal, segment, destination, tag)
    states = None
    if planned is not None:
        con.register(f"rewritten_{tag}", planned[1])
        rewritten = state_histogram(con, resolved_sql(f"SELECT * FROM rewritten_{tag}", acks, rej))
        states = [a + b for a, b in zip(planned[0], rewritten, strict=True)]
    if pointer.delta and pointer.base:
        base_rows = pq.ParquetFile(files.path(pointer.base)).metadata.num_rows
        delta_rows = pq.ParquetFile(files.path(pointer.delta)).metadata.num_rows
        if delta_rows > COMPACT_SHARE * base_rows:
            name = files.new_name("base", run_id)
            compact(con, files, pointer, payload_keys, resolved_sql(current, acks, rej), name)
            files.publish(name)
            pointer = journal.move_pair(segment, destination, pointer, name, None, run_id)
            journal.forget_batches(segment, destination, run_id)
            current = current_sql(files, pointer, schema)
            assert current is not None
            acks, rej = register_journal(con, journal, segment, destination, tag)
    files.collect([pointer.base, pointer.delta])
    counts = state_names(states) if states is not None else state_counts(con, resolved_sql(current, acks, rej))
    journal.set_counts(segment, destination, counts)
    return pointer


def read_pair(journal: Journal, root: Path, segment: str, destination: str, payload_keys: Sequence[str]) -> pa.Table:
    """A pair's rows as they stand (states settled), payload as sent (hex digests, clear text): for
    `status`, tests and audits. Columns: k, kind, st, pending, acc and one per payload key."""
    files = PairFiles(root, segment, destination)
    pointer = journal.pointer(segment, destination)
    schema = member_schema(payload_keys)
    current = current_sql(files, pointer, schema)
    cols = ", ".join(f'"p_{k}" AS "{k}"' if k in CLEAR_KEYS else f'lower(hex("p_{k}")) AS "{k}"' for k in payload_keys)
    con = duckdb.connect()
    try:
        if current is None:
            return con.sql("SELECT NULL::BLOB AS k, 0::UTINYINT AS kind LIMIT 0").to_arrow_table()
        acks, rej = register_journal(con, journal, segment, destination, "r")
        return con.sql(f"SELECT k, kind, st, pending, acc, {cols} FROM ({resolved_sql(current, acks, rej)})").to_arrow_table()
    finally:
        con.close()
