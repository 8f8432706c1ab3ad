"""The engine's SQL normalization path (`ColumnNormalizer`: DuckDB selects, DataFusion cleans and hashes) run on
a small table, for tests."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from connector.identifiers.columns import CLEAR_KEYS, ColumnNormalizer


def through_sql(rows: list[dict[str, str | None]], fields: list[str], platforms: list[str], region: str,
                ) -> dict[str, list[tuple[dict[str, str], set[str]]]]:  # fmt: skip
    """Per platform and row: (payload as sent, reasons) from the SQL path."""
    table = pa.table({f: pa.array([r.get(f) for r in rows], pa.string()) for f in fields})
    ids = ColumnNormalizer({f: f for f in fields}, platforms, region)
    con = duckdb.connect()
    con.register("t", table)
    rb = con.sql(ids.select("SELECT * FROM t", "true")).to_arrow_table().combine_chunks().to_batches()
    con.close()
    out: dict[str, list[tuple[dict[str, str], set[str]]]] = {}
    batch = rb[0] if rb else None
    for p in platforms:
        got: list[tuple[dict[str, str], set[str]]] = []
        if batch is None:
            out[p] = got
            continue
        payload, reasons = ids.payloads(ids.clean(batch), p, np.ones(batch.num_rows, dtype=bool))
        cols = {k: v.to_pylist() for k, v in payload.items()}
        for i in range(batch.num_rows):
            pay = {k: (v[i] if k in CLEAR_KEYS else v[i].hex()) for k, v in cols.items() if v[i] is not None}
            got.append((pay, {r for r, mask in reasons.items() if mask[i]}))
        out[p] = got
    return out
